"""Kubernetes pod discovery: subscribe (connect mode) to every Ready vLLM pod a label
selector matches, and drop pods that are deleted or stay not Ready.

``pods`` says what a pod means (is it a target, its id and endpoints), ``kube`` lists and
watches pods through the API, ``reconcile`` turns observations into subscriptions, and
``watch`` runs the list-and-watch loop (``PodWatcher``, started by ``service.app``).
"""

from service.discovery.watch import PodWatcher

__all__ = ["PodWatcher"]
