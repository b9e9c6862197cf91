"""Sealing blocks (AES-256-GCM) and secret files (genkey, loading)."""

from __future__ import annotations

import argparse
import io
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlend.errors import UserError
from memlend.lender.cli import add_genkey_arguments, run_genkey
from memlend.remote import sealing
from memlend.remote.sealing import OVERHEAD, RunSealer, Sealer, SealError, client_id_for
from memlend.remote.secret import auth_key, load_secret, write_secret

SEALER = Sealer.from_secret(b"s" * 32)
KEY = b"file-0001/block-0042/v3"


def test_round_trip_and_overhead() -> None:
    for data in (b"", b"x", os.urandom(4096), os.urandom(65536)):
        blob = SEALER.seal(KEY, data)
        assert len(blob) == len(data) + OVERHEAD
        assert SEALER.open(KEY, blob) == data
        assert SEALER.open(KEY, memoryview(blob)) == data
    # Random nonces: the same block never seals to the same blob.
    assert SEALER.seal(KEY, b"same") != SEALER.seal(KEY, b"same")


@pytest.mark.parametrize("into", [True, False], ids=["decrypt_into", "decrypt+copy"])
def test_open_into_writes_the_plaintext_in_place(monkeypatch, into: bool) -> None:
    monkeypatch.setattr(sealing, "_DECRYPT_INTO", into and sealing._DECRYPT_INTO)
    out = memoryview(bytearray(70000))
    for data in (b"", b"x", os.urandom(4096), os.urandom(65536)):
        blob = SEALER.seal(KEY, data)
        assert SEALER.open_into(KEY, memoryview(blob), out) == len(data)
        assert out[: len(data)] == data
    blob = bytearray(SEALER.seal(KEY, b"y" * 100))
    with pytest.raises(SealError, match="longer than a block"):
        SEALER.open_into(KEY, bytes(blob), out[:99])
    blob[50] ^= 1
    with pytest.raises(SealError, match="authentication"):
        SEALER.open_into(KEY, bytes(blob), out)
    with pytest.raises(SealError, match="not a sealed blob"):
        SEALER.open_into(KEY, b"\x01short", out)
    # A run's sealer opens blocks of its previous key too, and nothing older.
    run = RunSealer(b"s" * 32, b"epoch001", seals_per_key=1)
    old = run.seal(KEY, b"old")
    run.seal(KEY, b"rekeys")  # the second seal starts generation 1
    assert run.open_into(KEY, old, out) == 3 and out[:3] == b"old"
    run.seal(KEY, b"again")  # generation 2: `old` is two keys back
    with pytest.raises(SealError):
        run.open_into(KEY, old, out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_any_bit_flip_is_detected(data: bytes, draw: st.DataObject) -> None:
    blob = bytearray(SEALER.seal(KEY, data))
    bit = draw.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SealError):
        SEALER.open(KEY, bytes(blob))


def test_blob_under_another_key_or_version_fails() -> None:
    blob = SEALER.seal(KEY, b"contents")
    for other in (b"file-0001/block-0043/v3", b"file-0001/block-0042/v4", b""):
        with pytest.raises(SealError):
            SEALER.open(other, blob)


def test_truncated_or_foreign_blobs_fail() -> None:
    blob = SEALER.seal(KEY, os.urandom(100))
    for cut in (0, 1, OVERHEAD - 1, OVERHEAD, len(blob) - 1):
        with pytest.raises(SealError):
            SEALER.open(KEY, blob[:cut])
    with pytest.raises(SealError):  # another client's (or the lender's) key
        Sealer.from_secret(b"t" * 32).open(KEY, blob)


def test_keys_are_separated_by_purpose() -> None:
    secret = b"s" * 32
    assert auth_key(secret) != client_id_for(secret)
    assert len(client_id_for(secret)) == 16
    assert client_id_for(secret) == client_id_for(secret)
    assert client_id_for(secret) != client_id_for(b"t" * 32)


# ---- secret files -------------------------------------------------------------------


def genkey(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_genkey_arguments(parser)
    return run_genkey(parser.parse_args(list(argv)))


def test_genkey_writes_a_private_hex_secret(tmp_path, capsys) -> None:
    path = tmp_path / "secret"
    assert genkey(str(path)) == 0
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(str(path)) == bytes.fromhex(text)
    assert "0600" in capsys.readouterr().out


def test_genkey_refuses_to_overwrite_without_force(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        genkey(str(path))
    assert path.read_text() == "keep me"
    path.chmod(0o644)
    assert genkey(str(path), "--force") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(str(path)) != b"keep me"


def test_load_secret_checks(tmp_path) -> None:
    path = tmp_path / "s"
    for content in (b"", b"\n", b"ab" * 31, b"short raw bytes"):
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(UserError, match=r"empty|too short"):
            load_secret(str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_secret(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"directory|regular"):
        load_secret(str(tmp_path))
    raw = bytes(range(200, 240))  # not hex: taken as raw bytes
    path.write_bytes(raw)
    assert load_secret(str(path)) == raw


def test_load_secret_warns_once_when_others_can_read(tmp_path) -> None:
    path = tmp_path / "s"
    write_secret(str(path))
    err = io.StringIO()
    load_secret(str(path), warn=err)
    assert err.getvalue() == ""
    path.chmod(0o640)
    load_secret(str(path), warn=err)
    assert err.getvalue().count("\n") == 1 and "group or others" in err.getvalue()
