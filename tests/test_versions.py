"""Version ordering of each ecosystem (image/versions.py): known pairs from the
documents, properties every order has, and cross-checks against the real tools
(`dpkg --compare-versions`, rpm's own rpm.vercmp through `rpm --eval`)."""

from __future__ import annotations

import itertools
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import need_tool
from mesobox.image.versions import compare, parse_deb, sort_key

# (kind, older, newer) or equal pairs (kind, a, b, 0)
ORDERED = [
    # deb-version(7): the ~ rule, letters before non-letters, epochs, missing revision = 0
    ("deb", "1.0~rc1", "1.0", -1),
    ("deb", "1.0~~", "1.0~~a", -1),
    ("deb", "1.0~~a", "1.0~", -1),
    ("deb", "1.0~", "1.0", -1),
    ("deb", "1.0", "1.0a", -1),
    ("deb", "1.0a", "1.0+", -1),
    ("deb", "1.0", "1.0-0", 0),
    ("deb", "2.36-9", "2.36-9+deb12u4", -1),
    ("deb", "9:1.0", "10:0.1", -1),
    ("deb", "1:0.1", "2.0", 1),
    ("deb", "1.2.10", "1.2.9", 1),
    ("deb", "1.002", "1.2", 0),
    # rpm: ~ pre-release, ^ post-release snapshot, numeric beats alpha, separators weightless
    ("rpm", "1.0~rc1", "1.0", -1),
    ("rpm", "1.0^", "1.0", 1),
    ("rpm", "1.0^git1", "1.0.1", -1),
    ("rpm", "1.0~rc1^git1", "1.0~rc1", 1),
    ("rpm", "2a", "2.0", -1),
    ("rpm", "1.0010", "1.9", 1),
    ("rpm", "1_0", "1.0", 0),
    ("rpm", "5.5p1", "5.5p10", -1),
    ("rpm", "2.34-60.el9", "2.34-100.el9", -1),
    ("rpm", "1:1.0-1", "2.0-1", 1),
    ("rpm", "0:1.0-1", "1.0-1", 0),
    ("rpm", "1.2", "1.2-5", 0),  # a version without release matches every release
    # apk (Alpine pkgver): suffix ranks, letters, -rN, leading-zero numbers as text
    ("apk", "1.0_alpha", "1.0_beta", -1),
    ("apk", "1.0_beta2", "1.0_pre1", -1),
    ("apk", "1.0_rc1", "1.0", -1),
    ("apk", "1.0", "1.0_p1", -1),
    ("apk", "1.0_p1", "1.0.1", -1),
    ("apk", "1.0", "1.0a", -1),
    ("apk", "1.0-r9", "1.0-r10", -1),
    ("apk", "1.0-r0", "1.0", 0),
    ("apk", "1.2", "1.10", -1),
    ("apk", "1.01", "1.1", -1),
    ("apk", "3.0.8-r0", "3.0.10-r0", -1),
    ("apk", "2.36-r0", "2.36_git20220101-r0", -1),
    # PEP 440
    ("pypi", "1.0rc1", "1.0", -1),
    ("pypi", "1.0", "1.0.post1", -1),
    ("pypi", "1.0.dev1", "1.0a1", -1),
    ("pypi", "1!0.1", "2.0", 1),
    ("pypi", "1.0", "1.0.0", 0),
]


@pytest.mark.parametrize(("kind", "a", "b", "expected"), ORDERED)
def test_known_pairs(kind: str, a: str, b: str, expected: int) -> None:
    assert compare(kind, a, b) == expected
    assert compare(kind, b, a) == -expected


@pytest.mark.parametrize(("kind", "bad"), [
    ("deb", ""), ("deb", "a1.0"), ("deb", "x:1.0"), ("deb", "1.0 beta"),
    ("rpm", "x:1"), ("rpm", ""),
    ("apk", "1.0_foo"), ("apk", "1.0-rx"), ("apk", "abc"),
    ("pypi", "not a version"),
])
def test_rejected_versions(kind: str, bad: str) -> None:
    with pytest.raises(ValueError):
        compare(kind, bad, "1.0")


def test_string_order_is_not_used() -> None:
    """The point of it all: as text, 1.10 < 1.9; in every ecosystem, 1.10 is newer."""
    for kind in ("deb", "rpm", "apk", "pypi"):
        assert compare(kind, "1.10", "1.9") == 1
    assert sorted(["1.10", "1.9", "1.9~rc1"], key=sort_key("deb")) == ["1.9~rc1", "1.9", "1.10"]


# --- properties -------------------------------------------------------------------------------

DEB_CHARS = "0123456789.+~ab"
deb_part = st.text(alphabet=DEB_CHARS, max_size=6)
deb_versions = st.builds(
    lambda epoch, head, up, rev: (f"{epoch}:" if epoch is not None else "") + head + up + (f"-{rev}" if rev else ""),
    st.one_of(st.none(), st.integers(0, 3)), st.sampled_from("0123456789"), deb_part,
    st.text(alphabet=DEB_CHARS, max_size=4),
)
rpm_versions = st.text(alphabet="0123456789.ab~^_", min_size=1, max_size=8)
apk_versions = st.builds(
    lambda nums, letter, suffix, rev: ".".join(nums) + letter + suffix + (f"-r{rev}" if rev is not None else ""),
    st.lists(st.sampled_from(["0", "1", "2", "10", "01"]), min_size=1, max_size=3),
    st.sampled_from(["", "a", "b"]),
    st.sampled_from(["", "_alpha", "_rc1", "_p2", "_git", "_pre1_p1"]),
    st.one_of(st.none(), st.integers(0, 12)),
)
STRATEGIES = {"deb": deb_versions, "rpm": rpm_versions, "apk": apk_versions}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_total_order_properties(kind: str) -> None:
    strategy = STRATEGIES[kind]

    @settings(max_examples=300, deadline=None)
    @given(strategy, strategy, strategy)
    def check(a: str, b: str, c: str) -> None:
        assert compare(kind, a, a) == 0
        assert compare(kind, a, b) == -compare(kind, b, a)
        if compare(kind, a, b) <= 0 and compare(kind, b, c) <= 0:
            assert compare(kind, a, c) <= 0

    check()


# --- the real tools ---------------------------------------------------------------------------


def _dpkg_order(a: str, b: str) -> int:
    def holds(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b], capture_output=True).returncode == 0

    return -1 if holds("lt") else 0 if holds("eq") else 1


@settings(max_examples=200, deadline=None)
@given(deb_versions, deb_versions)
def test_dpkg_agrees(a: str, b: str) -> None:
    need_tool("dpkg")
    try:
        parse_deb(a)
        parse_deb(b)
    except ValueError:
        return
    assert compare("deb", a, b) == _dpkg_order(a, b), (a, b)


def test_dpkg_agrees_on_versions_of_a_real_image() -> None:
    """Every adjacent pair of the versions in this host's own dpkg database, and each
    with a ~, + and epoch variant: what the scan compares in practice."""
    need_tool("dpkg-query")
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}\n"], capture_output=True, text=True, check=True)
    versions = sorted(set(out.stdout.split()))[:60]
    pairs = list(itertools.pairwise(versions))
    pairs += [(v, v + "~1") for v in versions[:20]] + [(v, "1:" + v) for v in versions[:10]]
    for a, b in pairs:
        assert compare("deb", a, b) == _dpkg_order(a, b), (a, b)


def test_rpm_agrees() -> None:
    """rpm's own rpm.vercmp (lua in `rpm --eval`) on many pairs, in one call."""
    need_tool("rpm")
    import random

    rng = random.Random(15)
    alphabet = "0123456789.ab~^_"
    pairs = [("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))),
              "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))) for _ in range(400)]
    pairs += [(a, b) for kind, a, b, _ in ORDERED if kind == "rpm" and ":" not in a + b and "-" not in a + b]
    lua = " ".join(f'print(rpm.vercmp("{a}", "{b}")) print(" ")' for a, b in pairs)
    out = subprocess.run(["rpm", "--eval", f"%{{lua: {lua}}}"], capture_output=True, text=True, check=True)
    theirs = [int(x) for x in out.stdout.split()]
    assert len(theirs) == len(pairs)
    from mesobox.image.versions import rpmvercmp

    wrong = [(a, b, rpmvercmp(a, b), t) for (a, b), t in zip(pairs, theirs, strict=True) if rpmvercmp(a, b) != t]
    assert not wrong
