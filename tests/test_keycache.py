import pytest

from cipherpool.fhe.keycache import KeyCache


def loader(value, size):
    calls = []

    def load():
        calls.append(value)
        return value, size

    return load, calls


def test_second_get_is_a_hit_and_does_not_load_again():
    cache = KeyCache(capacity_bytes=1000)
    load, calls = loader("k", 10)
    assert cache.get_or_load("a", load) == ("k", False)
    assert cache.get_or_load("a", load) == ("k", True)
    assert calls == ["k"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)


@pytest.mark.parametrize(
    "capacity, factor, sizes, kept",
    [
        (100, 1.0, [40, 40, 40], ["b", "c"]),  # third evicts the oldest
        (100, 2.0, [40, 40], ["b"]),  # charged size is size x factor
        (10, 1.0, [50], ["a"]),  # a lone oversize entry is kept
        (1000, 6.0, [10, 10, 10], ["a", "b", "c"]),
    ],
)
def test_cache_is_bounded_in_charged_bytes(capacity, factor, sizes, kept):
    cache = KeyCache(capacity_bytes=capacity, memory_factor=factor)
    for name, size in zip("abc", sizes):
        cache.get_or_load(name, loader(name, size)[0])
    assert [k for k in "abc" if k in cache] == kept


def test_lru_order_follows_use():
    cache = KeyCache(capacity_bytes=100)
    cache.get_or_load("a", loader("a", 40)[0])
    cache.get_or_load("b", loader("b", 40)[0])
    cache.get_or_load("a", loader("a", 40)[0])  # a is now the most recent
    cache.get_or_load("c", loader("c", 40)[0])  # evicts b
    assert cache.stats().evictions == 1
    assert cache.get_or_load("a", loader("x", 1)[0]) == ("a", True)
