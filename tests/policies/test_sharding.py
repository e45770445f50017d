import json
import os
import subprocess
import sys
from collections import Counter

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.plan import ShardingSpec
from policies.sharding import Rendezvous, extract_key, score, shard_for

FIVE = ["a", "b", "c", "d", "e"]
KEYS = [f"sku-{i}" for i in range(10_000)]


def test_same_key_same_shard_in_another_process():
    keys = KEYS[:300] + ["", "é-ü", "💥"]
    here = [shard_for(k, FIVE) for k in keys]
    code = (
        "import json, sys\n"
        "from policies.sharding import shard_for\n"
        "keys = json.loads(sys.stdin.read())\n"
        f"print(json.dumps([shard_for(k, {FIVE!r}) for k in keys]))\n"
    )
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(keys), capture_output=True,
            text=True, env=env, check=True, timeout=60,
        )
        assert json.loads(out.stdout) == here


def test_known_values_pin_the_hash():
    # A change of hash function would remap every key in every deployed sidecar.
    assert score("a", "sku-1") == int.from_bytes(
        __import__("hashlib").blake2b(b"a\x00sku-1", digest_size=8).digest(), "big"
    )
    assert [shard_for(k, FIVE) for k in ("sku-0", "sku-1", "sku-2", "user-42")] == [
        shard_for(k, list(reversed(FIVE))) for k in ("sku-0", "sku-1", "sku-2", "user-42")
    ]


def test_ten_thousand_keys_over_five_shards_are_balanced():
    counts = Counter(shard_for(k, FIVE) for k in KEYS)
    assert set(counts) == set(FIVE)
    for n in counts.values():
        assert 2000 * 0.85 <= n <= 2000 * 1.15


def test_adding_a_sixth_shard_moves_about_a_sixth_and_only_to_it():
    before = {k: shard_for(k, FIVE) for k in KEYS}
    after = {k: shard_for(k, FIVE + ["f"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert len(moved) <= len(KEYS) * (1 / 6 + 0.03)
    assert len(moved) >= len(KEYS) * (1 / 6 - 0.03)  # and the new shard takes its share
    assert all(after[k] == "f" for k in moved)


def test_a_single_shard_takes_every_key():
    assert {shard_for(k, ["only"]) for k in KEYS[:100]} == {"only"}


def test_no_shards_is_an_error():
    with pytest.raises(ValueError, match="at least one shard"):
        shard_for("k", [])


names = st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), min_size=1, max_size=8, unique=True)


@settings(max_examples=200, deadline=None, database=None)
@given(key=st.text(st.characters(codec="utf-8"), max_size=30), shards=names, data=st.data())
def test_stable_and_order_independent(key, shards, data):
    chosen = shard_for(key, shards)
    assert chosen in shards
    assert Rendezvous(shards).pick(key) == chosen
    shuffled = data.draw(st.permutations(shards))
    assert shard_for(key, shuffled) == chosen


@settings(max_examples=200, deadline=None, database=None)
@given(key=st.text(max_size=30), shards=names, new=st.text(min_size=1, max_size=8))
def test_minimal_movement(key, shards, new):
    if new in shards:
        return
    before = shard_for(key, shards)
    after = shard_for(key, shards + [new])
    assert after in (before, new)  # a key moves only to the shard that was added
    if len(shards) > 1:
        removed = [s for s in shards if s != before][0]
        # removing a shard that does not own the key leaves it where it was
        assert shard_for(key, [s for s in shards if s != removed]) == before


# -- extracting the key ----------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"X-Sku": "s1"}, {"x-sku": "s1"}, httpx.Headers({"X-SKU": "s1"})])
def test_key_from_header(headers):
    assert extract_key(ShardingSpec("header", "X-Sku"), "/", "", headers) == "s1"


def test_missing_or_empty_header_is_no_key():
    spec = ShardingSpec("header", "X-Sku")
    assert extract_key(spec, "/", "", {}) is None
    assert extract_key(spec, "/", "", {"X-Sku": ""}) is None


@pytest.mark.parametrize(
    "query,expected",
    [("tenant=t1", "t1"), ("a=1&tenant=t%202&tenant=t3", "t 2"), ("a=1", None), ("tenant=", None), ("", None)],
)
def test_key_from_query(query, expected):
    assert extract_key(ShardingSpec("query", "tenant"), "/x", query, {}) == expected


@pytest.mark.parametrize(
    "cookie,expected",
    [("sid=abc", "abc"), ("a=1; sid=xyz; b=2", "xyz"), ('sid="q"', "q"), ("xsid=1", None), ("", None)],
)
def test_key_from_cookie(cookie, expected):
    spec = ShardingSpec("cookie", "sid")
    assert extract_key(spec, "/", "", {"Cookie": cookie}) == expected
    assert extract_key(spec, "/", "", httpx.Headers({"cookie": cookie})) == expected


def test_key_from_several_cookie_headers():
    headers = httpx.Headers([("cookie", "a=1"), ("cookie", "sid=two")])
    assert extract_key(ShardingSpec("cookie", "sid"), "/", "", headers) == "two"


@pytest.mark.parametrize(
    "path,n,expected",
    [("/users/42/orders", "1", "users"), ("/users/42/orders", "2", "42"), ("/users/42", "3", None),
     ("/users/42?x=1", "2", "42"), ("/", "1", None), ("/a//b", "2", "b")],
)
def test_key_from_path_segment(path, n, expected):
    assert extract_key(ShardingSpec("path-segment", n), path, "", {}) == expected


def test_bad_path_segment_specs():
    with pytest.raises(ValueError, match="number"):
        extract_key(ShardingSpec("path-segment", "two"), "/a/b", "", {})
    with pytest.raises(ValueError, match="count from 1"):
        extract_key(ShardingSpec("path-segment", "0"), "/a/b", "", {})
