"""The query APIs: shared query logic, REST routes, gRPC servicers."""
