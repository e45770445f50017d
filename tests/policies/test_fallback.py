import json

import pytest

from dsl.plan import FallbackSpec
from policies.fallback import StaleCache, StaticAnswer, cache_key


def test_cache_key_is_method_and_url():
    assert cache_key("get", "http://inv/items?id=1") == "GET http://inv/items?id=1"
    assert cache_key("GET", "http://inv/items?id=1") != cache_key("HEAD", "http://inv/items?id=1")


def test_get_returns_the_entry_while_younger_than_max_age():
    c = StaleCache()
    c.put("GET /a", 200, [("content-type", "text/plain")], b"hello", now=100.0)
    hit = c.get("GET /a", max_age=300.0, now=399.9)
    assert hit is not None
    assert (hit.status, hit.headers, hit.body) == (200, [("content-type", "text/plain")], b"hello")
    assert hit.age(399.9) == pytest.approx(299.9)
    assert c.get("GET /a", max_age=300.0, now=400.0) is None  # exactly D old: expired
    assert c.get("GET /b", max_age=300.0, now=100.0) is None


def test_a_new_answer_replaces_the_old_one():
    c = StaleCache()
    c.put("k", 200, [], b"old", now=0.0)
    c.put("k", 200, [], b"newer", now=10.0)
    assert c.get("k", 60.0, 20.0).body == b"newer"
    assert len(c) == 1 and c.bytes == len("k") + len("newer")


def test_bounded_in_entries_least_recently_used_first():
    c = StaleCache(max_entries=3)
    for k in "abc":
        c.put(k, 200, [], b"x", now=0.0)
    assert c.get("a", 60.0, 1.0) is not None  # a is now the most recent
    c.put("d", 200, [], b"x", now=1.0)
    assert "b" not in c
    assert all(k in c for k in "acd")
    assert len(c) == 3


def test_bounded_in_bytes():
    c = StaleCache(max_entries=100, max_bytes=100, max_entry_bytes=100)
    for i in range(10):
        c.put(f"k{i}", 200, [], b"x" * 30, now=0.0)  # 32 bytes each with the key
        assert c.bytes <= 100
    assert len(c) == 3
    assert [k in c for k in ("k7", "k8", "k9")] == [True, True, True]


def test_headers_count_toward_the_bytes():
    c = StaleCache()
    c.put("k", 200, [("a", "bb")], b"ccc", now=0.0)
    assert c.bytes == 1 + 3 + 3


def test_an_entry_too_large_is_not_kept_and_drops_the_older_one():
    c = StaleCache(max_entry_bytes=10)
    assert c.put("k", 200, [], b"small", now=0.0)
    assert not c.put("k", 200, [], b"x" * 50, now=1.0)
    assert "k" not in c and c.bytes == 0


def test_many_keys_stay_within_bounds():
    c = StaleCache(max_entries=50, max_bytes=2000)
    for i in range(5000):
        c.put(f"GET http://x/{i}", 200, [], b"y" * (i % 90), now=float(i))
        assert len(c) <= 50 and c.bytes <= 2000
    assert c.bytes == sum(e.size for e in c._entries.values())


def test_snapshot_counts_hits_and_misses():
    c = StaleCache()
    c.put("k", 200, [], b"v", now=0.0)
    c.get("k", 10.0, 1.0)
    c.get("k", 10.0, 11.0)
    assert c.snapshot() == {"entries": 1, "bytes": 2, "max_entries": 1024,
                            "max_bytes": 16 * 1024 * 1024, "hits": 1, "misses": 1}


def test_bad_bounds():
    with pytest.raises(ValueError, match="positive"):
        StaleCache(max_entries=0)


def test_static_json_and_text_answers():
    spec = FallbackSpec("static", status=503, body='{"error": "down"}', content_type="application/json")
    j = StaticAnswer.from_spec(spec)
    assert j.status == 503 and json.loads(j.body) == {"error": "down"}
    assert ("content-type", "application/json") in j.headers
    assert ("content-length", str(len(j.body))) in j.headers
    t = StaticAnswer.from_spec(FallbackSpec("static", status=200, body="héllo"))
    assert t.body == "héllo".encode() and ("content-type", "text/plain; charset=utf-8") in t.headers


def test_static_file_answer(tmp_path):
    f = tmp_path / "recs.json"
    f.write_text('{"items": []}')
    a = StaticAnswer.from_spec(FallbackSpec("static", status=200, file=str(f)))
    assert a.body == b'{"items": []}'
    assert ("content-type", "application/json") in a.headers


def test_missing_static_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        missing = str(tmp_path / "missing.json")
        StaticAnswer.from_spec(FallbackSpec("static", status=200, file=missing))
    with pytest.raises(ValueError, match="not a static fallback"):
        StaticAnswer.from_spec(FallbackSpec("stale", max_age=60.0))
