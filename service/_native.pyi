from collections.abc import Sequence

def chain_keys(data: bytes, step: int, seed: int, /) -> list[int]: ...
def lookup_values(
    by_route: list[dict[int, int]], mask: int, keys: Sequence[int], /
) -> list[int]: ...
def store_fields(
    by_route: list[dict[int, int]],
    mask: int,
    keys: Sequence[int],
    shift: int,
    tier_bit: int,
    gen_bits: int,
    /,
) -> tuple[int, list[int]]: ...
def set_routed(
    by_route: list[dict[int, int]],
    limits: list[int],
    mask: int,
    keys: Sequence[int],
    values: Sequence[int],
    /,
) -> list[int]: ...
def unpack_tokens(raw: bytes, /) -> bytes: ...
def summarize(
    values: Sequence[int], slots: Sequence[int], /
) -> list[tuple[int, int, dict[int, int]]]: ...
def unpack_json_tokens(raw: bytes, /) -> bytes: ...
