"""API keys at the gateway edge: a key made by `pdserve keys` lets its holder in and nobody else, no secret is
kept or echoed, and each key's concurrency and tokens-per-minute limits hold, under threads too."""

import argparse
import threading
import time
from pathlib import Path

import pytest

from common.basics.errors import ResourceExhausted
from common.edge.auth import (
    ANONYMOUS,
    ApiKeys,
    KeyLimits,
    KeyRecord,
    RateLimited,
    Unauthenticated,
    authorization_of,
    digest_of,
    parse_line,
)
from pdserve.keys import COMMAND, add_key


def make_store(tmp_path: Path, limits: KeyLimits = KeyLimits()) -> tuple[ApiKeys, str]:
    secret = add_key(tmp_path / "keys.txt", "alice", limits)
    return ApiKeys.load(tmp_path / "keys.txt"), secret


def limited(max_concurrent: int | None = None, tokens_per_minute: int | None = None) -> tuple[ApiKeys, KeyRecord]:
    record = KeyRecord("alice", digest_of("pdk_test"), KeyLimits(max_concurrent, tokens_per_minute))
    return ApiKeys([record]), record


def test_a_made_key_authenticates_and_the_file_holds_only_its_hash(tmp_path):
    keys, secret = make_store(tmp_path, KeyLimits(max_concurrent=2, tokens_per_minute=600))
    record = keys.authenticate(f"Bearer {secret}")
    assert record.name == "alice"
    assert record.limits == KeyLimits(2, 600)
    assert keys.authenticate(f"bearer   {secret} ") == record  # the scheme is case-insensitive (RFC 7235)
    text = (tmp_path / "keys.txt").read_text()
    assert secret not in text and secret[len("pdk_"):] not in text
    assert text == f"alice sha256${digest_of(secret)} max_concurrent=2 tokens_per_minute=600\n"
    assert (tmp_path / "keys.txt").stat().st_mode & 0o777 == 0o600
    assert secret.startswith("pdk_") and len(secret) == len("pdk_") + 43


def test_the_command_prints_the_secret_once_and_appends(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    COMMAND.add_arguments(parser, tmp_path)
    for name in ("alice", "bob"):
        assert COMMAND.run(parser.parse_args(["--file", str(tmp_path / "k"), "--name", name]), tmp_path) == 0
    secrets = capsys.readouterr().out.split()
    keys = ApiKeys.load(tmp_path / "k")
    assert [keys.authenticate(f"Bearer {secret}").name for secret in secrets] == ["alice", "bob"]
    with pytest.raises(ValueError, match="already has a key named 'alice'"):
        COMMAND.run(parser.parse_args(["--file", str(tmp_path / "k"), "--name", "alice"]), tmp_path)


@pytest.mark.parametrize("header, hint", [
    (None, "send `authorization: Bearer <key>`"),
    ("", "send `authorization: Bearer <key>`"),
    ("Basic {secret}", "not `Bearer <key>`"),
    ("{secret}", "not `Bearer <key>`"),
    ("Bearer ", "not `Bearer <key>`"),
    ("Bearer {secret}x", "not known to this gateway"),
    ("Bearer pdk_{secret}", "not known to this gateway"),
])
def test_a_bad_header_is_unauthenticated_without_echoing_the_secret(tmp_path, header, hint):
    keys, secret = make_store(tmp_path)
    with pytest.raises(Unauthenticated, match=hint.replace("`", ".").replace("<", ".").replace(">", ".")) as caught:
        keys.authenticate(None if header is None else header.format(secret=secret))
    assert secret not in str(caught.value) and secret[len("pdk_"):] not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_the_record_never_shows_its_hash():
    record = KeyRecord("alice", digest_of("pdk_secret"), KeyLimits(1, 2))
    assert repr(record) == "KeyRecord(name='alice')" and str(record) == repr(record)


@pytest.mark.parametrize("line, message", [
    ("alice", "expected `NAME"),
    ("alice pdk_the-secret-itself", "second field must be `sha256\\$`"),
    ("alice sha256$abc", "second field must be `sha256\\$`"),
    (f"alice sha256${'0' * 64} max_concurrent=0", "max_concurrent must be at least 1"),
    (f"alice sha256${'0' * 64} burst=3", "options are"),
    (f"alice sha256${'0' * 64} max_concurrent=1 max_concurrent=2", "once each"),
    (f"pdk_abc sha256${'0' * 64}", "must not start with 'pdk_'"),
])
def test_a_malformed_line_is_refused_without_quoting_its_hash_field(line, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_line(line)
    assert "the-secret-itself" not in str(caught.value)


def test_load_names_the_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# operators\n\nalice sha256${'a' * 64}  # laptop\nbob sha256${'b' * 64}\nbob x\n")
    with pytest.raises(ValueError, match=f"{path}:5: key 'bob'"):
        ApiKeys.load(path)
    path.write_text(f"alice sha256${'a' * 64}\nbob sha256${'a' * 64}\n")
    with pytest.raises(ValueError, match="'alice' and 'bob' are the same key"):
        ApiKeys.load(path)
    path.write_text(f"alice sha256${'a' * 64}\nalice sha256${'b' * 64}\n")
    with pytest.raises(ValueError, match="two keys are named 'alice'"):
        ApiKeys.load(path)


def test_a_disabled_store_admits_everything():
    keys = ApiKeys.disabled()
    assert keys.authenticate(None) is ANONYMOUS and keys.authenticate("Bearer whatever") is ANONYMOUS
    admissions = [keys.admit(ANONYMOUS, 10**9, now=0.0) for _ in range(1000)]
    assert len(admissions) == 1000


def test_concurrency_limit_refuses_the_one_over_and_admits_after_a_release():
    keys, record = limited(max_concurrent=2)
    first = keys.admit(record, 1, now=0.0)
    keys.admit(record, 1, now=0.0)
    with pytest.raises(RateLimited, match="2 requests in flight") as caught:
        keys.admit(record, 1, now=0.0)
    assert isinstance(caught.value, ResourceExhausted) and caught.value.retry_after_s is None
    first.release(1)
    first.release(1)  # a second release frees nothing more
    keys.admit(record, 1, now=0.0)
    assert keys.in_flight(record) == 2
    with pytest.raises(RateLimited):
        keys.admit(record, 1, now=0.0)


def test_the_token_bucket_says_when_to_retry_and_refills_by_then():
    keys, record = limited(tokens_per_minute=600)  # 10 tokens/s
    keys.admit(record, 500, now=100.0).release(500)
    with pytest.raises(RateLimited, match="retry in 20.0 s") as caught:
        keys.admit(record, 300, now=100.0)  # 100 left, 200 short
    assert caught.value.retry_after_s == pytest.approx(20.0)
    with pytest.raises(RateLimited):
        keys.admit(record, 300, now=119.0)
    keys.admit(record, 300, now=120.0)


def test_release_corrects_the_estimate_both_ways():
    keys, record = limited(tokens_per_minute=600)
    keys.admit(record, 600, now=0.0).release(100)  # 500 refunded: 500 left
    keys.admit(record, 500, now=0.0).release(500)
    with pytest.raises(RateLimited):
        keys.admit(record, 1, now=0.0)
    keys, record = limited(tokens_per_minute=600)
    keys.admit(record, 100, now=0.0).release(700)  # used 600 more than estimated: 100 short
    with pytest.raises(RateLimited) as caught:
        keys.admit(record, 100, now=0.0)
    assert caught.value.retry_after_s == pytest.approx(20.0)


def test_a_request_larger_than_a_minute_never_fits():
    keys, record = limited(tokens_per_minute=600)
    with pytest.raises(RateLimited, match="lower max_tokens") as caught:
        keys.admit(record, 601, now=0.0)
    assert caught.value.retry_after_s is None


def test_as_a_context_manager_an_unreleased_admission_keeps_its_estimate():
    keys, record = limited(max_concurrent=1, tokens_per_minute=600)
    with pytest.raises(KeyError):
        with keys.admit(record, 400, now=0.0):
            raise KeyError("the request failed")
    assert keys.in_flight(record) == 0
    with pytest.raises(RateLimited):
        keys.admit(record, 300, now=0.0)


def test_threads_never_exceed_the_concurrency_limit():
    keys, record = limited(max_concurrent=3)
    lock, in_flight, peak, refused = threading.Lock(), [0], [0], [0]

    def worker() -> None:
        for _ in range(200):
            try:
                admission = keys.admit(record, 1)
            except RateLimited:
                with lock:
                    refused[0] += 1
                continue
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.0005)  # hold the slot so that the threads contend for it
            with lock:
                in_flight[0] -= 1
            admission.release(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert peak[0] <= 3 and keys.in_flight(record) == 0
    assert refused[0] > 0


def test_authorization_comes_from_grpc_metadata():
    assert authorization_of([("x-request-id", "r"), ("authorization", "Bearer k")]) == "Bearer k"
    assert authorization_of([("authorization", b"Bearer k")]) == "Bearer k"
    assert authorization_of([]) is None
