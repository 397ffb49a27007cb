"""Replay control (ticker/core/control.py): signed commands, their verifier and the wrong-token
limiter, fed literal values and times."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ticker.core.control import Answer, Command, ControlError, FailureLimiter, Verifier, nonce_of, \
    parse_command, read_answer, sign, sign_answer

KEY = "s3cret-token"
NOW = 1_700_000_000.0
NONCE = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("command", [Command("pause"), Command("resume"), Command("reset"),
                                     Command("speed", 120.0), Command("speed", None),
                                     Command("seek", to="11-11 00:30")])
def test_a_signed_command_verifies_as_itself(command):
    """Every command, signed with the key, comes out of the verifier unchanged."""
    assert Verifier(KEY).verify(sign(command, KEY, now=NOW), NOW + 1) == command


def test_the_signed_message_holds_a_mac_over_its_fields_and_never_the_token():
    """The message is v, cmd, ts, nonce and an HMAC-SHA256 of the sorted other fields; the
    token is not in it."""
    payload = sign(Command("speed", 60.0), KEY, now=NOW, nonce=NONCE)
    doc = orjson.loads(payload)
    assert KEY.encode() not in payload and "token" not in doc
    assert doc == {"v": 1, "cmd": "speed", "speed": 60.0, "ts": NOW, "nonce": NONCE,
                   "mac": doc["mac"]}
    body = {k: v for k, v in doc.items() if k != "mac"}
    expected = hmac.new(KEY.encode(), orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
                        hashlib.sha256).hexdigest()
    assert doc["mac"] == expected


def test_each_signature_has_a_new_nonce():
    """Two signatures of the same command at the same time differ by their nonce."""
    first, second = (orjson.loads(sign(Command("pause"), KEY, now=NOW)) for _ in range(2))
    assert first["nonce"] != second["nonce"] and len(first["nonce"]) == 32


def tampered(**fields) -> bytes:
    doc = orjson.loads(sign(Command("pause"), KEY, now=NOW, nonce=NONCE))
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize("payload, reason", [
    (tampered(cmd="reset"), "bad mac"),
    (tampered(ts=NOW + 1), "bad mac"),
    (tampered(extra=1), "bad mac"),
    (tampered(mac=None), "no mac"),
    (tampered(mac="00" * 31), "no mac"),
    (sign(Command("pause"), "another-token", now=NOW), "bad mac"),
    (b"not json", "not JSON"),
    (b"[1]", "a command is a JSON object"),
    (tampered(cmd={"nested": [1]}), "plain values"),
    (b'{"pad": "' + b"x" * 5000 + b'"}', "at most 4096"),
])
def test_a_forged_or_malformed_command_is_refused(payload, reason):
    """A changed field, a missing or wrong MAC, the wrong key, or no JSON object: refused with
    the reason."""
    with pytest.raises(ControlError, match=reason):
        Verifier(KEY).verify(payload, NOW)


@pytest.mark.parametrize("sent_at, reason", [(NOW - 31, "stale: sent 31 s ago"),
                                             (NOW + 31, "stale: dated 31 s ahead")])
def test_a_command_older_or_newer_than_max_age_is_stale(sent_at, reason):
    """A command more than 30 s from the verifier's clock, either way, is refused."""
    with pytest.raises(ControlError, match=reason):
        Verifier(KEY).verify(sign(Command("pause"), KEY, now=sent_at), NOW)


def test_a_command_seen_before_is_refused_as_replayed():
    """The same signed command twice: obeyed once, then refused while it could still pass the
    age check, and stale after."""
    verifier = Verifier(KEY)
    payload = sign(Command("pause"), KEY, now=NOW)
    assert verifier.verify(payload, NOW).cmd == "pause"
    for later in (NOW + 1, NOW + 30):
        with pytest.raises(ControlError, match="replayed"):
            verifier.verify(payload, later)
    with pytest.raises(ControlError, match="stale"):
        verifier.verify(payload, NOW + 31)


def test_nonces_are_forgotten_once_stale_and_a_full_store_refuses_new_commands():
    """With room for 3 nonces, a fourth fresh command is refused, and taken once the first
    three are too old to replay."""
    verifier = Verifier(KEY, max_age=10, max_nonces=3)
    for i in range(3):
        verifier.verify(sign(Command("pause"), KEY, now=NOW + i), NOW + i)
    with pytest.raises(ControlError, match="more than 3 commands in 10 s"):
        verifier.verify(sign(Command("resume"), KEY, now=NOW + 3), NOW + 3)
    assert verifier.verify(sign(Command("resume"), KEY, now=NOW + 13), NOW + 13).cmd == "resume"


@pytest.mark.parametrize("doc, reason", [
    ({"cmd": "explode"}, "unknown cmd 'explode'"),
    ({"cmd": "speed", "speed": 0}, "speed=0"),
    ({"cmd": "speed", "speed": True}, "speed=True"),
    ({"cmd": "speed", "speed": "fast"}, "speed='fast'"),
    ({"cmd": "seek"}, "seek needs"),
    ("pause", "a command is a JSON object"),
])
def test_parse_command_checks_the_fields(doc, reason):
    """An unknown command, a bad speed or a seek without a time is refused with the reason."""
    with pytest.raises(ControlError, match=reason):
        parse_command(doc)


@pytest.mark.parametrize("make, message", [
    (lambda: Verifier(""), "key='': must not be empty"),
    (lambda: Verifier(KEY, max_age=0), "max_age=0: must be a positive number of seconds"),
    (lambda: Verifier(KEY, max_nonces=0), "max_nonces=0: must be positive"),
    (lambda: sign(Command("pause"), "", now=NOW), "key='': must not be empty"),
    (lambda: sign(Command("pause"), KEY, now=NOW, nonce="abc"), "nonce='abc'"),
    (lambda: FailureLimiter(burst=0), "burst=0: must be positive"),
    (lambda: FailureLimiter(refill=-1), "refill=-1: must be a positive number of seconds"),
])
def test_limits_are_checked_up_front(make, message):
    """A bad key, age, store size, nonce, burst or refill is refused naming the parameter."""
    with pytest.raises(ValueError, match=message):
        make()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda d: orjson.dumps(d), st.dictionaries(
    st.sampled_from(["v", "cmd", "ts", "nonce", "mac", "speed", "to"]),
    st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=70))))
def test_verify_raises_only_control_error_whatever_arrives(payload):
    """Arbitrary bytes or objects on the control topic raise ControlError, never anything
    else."""
    with pytest.raises(ControlError):
        Verifier(KEY).verify(payload, NOW)


def test_failure_limiter_allows_a_burst_then_one_failure_a_second():
    """Five failures at once empty the bucket; it then refills one attempt per second."""
    limiter = FailureLimiter(burst=5, refill=1.0)
    for _ in range(5):
        assert limiter.retry_in(NOW) == 0
        limiter.failed(NOW)
    assert limiter.retry_in(NOW) == pytest.approx(1.0)
    assert limiter.retry_in(NOW + 0.25) == pytest.approx(0.75)
    assert limiter.retry_in(NOW + 1) == 0
    limiter.failed(NOW + 1)
    assert limiter.retry_in(NOW + 1) == pytest.approx(1.0)
    assert limiter.retry_in(NOW + 100) == 0  # refilled, but never past the burst:
    for _ in range(5):
        limiter.failed(NOW + 100)
    assert limiter.retry_in(NOW + 100) > 0


def test_an_answer_reads_as_verified_only_with_the_replays_token():
    """A replay's answer, MAC'd with its token, reads back as itself and verified with that
    token; with another token (a wrong one, or a forger's) it reads unverified, and anything
    that is not an answer is a ControlError."""
    answer = Answer(NONCE, "pause", True, "paused at 11-11 00:31", "sim-1")
    payload = sign_answer(answer, KEY)
    assert read_answer(payload, KEY) == Answer(NONCE, "pause", True, "paused at 11-11 00:31",
                                               "sim-1", verified=True)
    assert not read_answer(payload, "other").verified
    forged = orjson.dumps({**orjson.loads(payload), "ok": False})
    assert not read_answer(forged, KEY).verified
    for junk in (b"", b"[]", b'{"v": 1}', b"x" * 5000):
        with pytest.raises(ControlError):
            read_answer(junk, KEY)
    assert answer.line() == ("pause done by replay sim-1: paused at 11-11 00:31 (unverified: "
                             "this token does not match the replay's)")


def test_the_nonce_of_a_command_is_found_even_when_it_does_not_verify():
    """A refusal must reach its sender: the nonce is read from any well-formed command,
    signed with any key, and from nothing else."""
    assert nonce_of(sign(Command("pause"), "wrong", now=NOW, nonce=NONCE)) == NONCE
    assert nonce_of(b'{"nonce": "not hex"}') is None
    assert nonce_of(b"not json") is None


def test_an_answer_never_passes_for_a_command_nor_a_command_for_an_answer():
    """Both are MAC'd with the same token; the answer's `kind` (under the MAC) and the
    command's required `ts` keep one from being taken for the other."""
    answer = sign_answer(Answer(NONCE, "pause", True, "paused", "sim-1"), KEY)
    with pytest.raises(ControlError):
        Verifier(KEY).verify(answer, NOW)
    with pytest.raises(ControlError, match="not a version 1 answer"):
        read_answer(sign(Command("pause"), KEY, now=NOW, nonce=NONCE), KEY)
    doc = orjson.loads(answer)
    del doc["kind"]
    with pytest.raises(ControlError, match="not a version 1 answer"):
        read_answer(orjson.dumps(doc), KEY)
