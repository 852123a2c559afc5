"""The console wire protocol, byte for byte, against values computed independently.

The reference values come from libsodium's `crypto_secretbox_easy` through PyNaCl's low-level
bindings (the very call the C++ daemon makes), from nonces merged and incremented by hand here,
and from one fixed known-answer vector, so a mistake in `protocol` cannot hide behind itself.
"""

from __future__ import annotations

import base64
import re

import nacl.bindings
import pytest

from trackalert.console import protocol
from trackalert.console.protocol import (
    MAX_FRAME,
    MAX_TEXT,
    Channel,
    DecryptError,
    MessageTooLong,
)
from trackalert.lua.api_console import crypto_works, format_eventlog_summary

KEY = bytes(range(32))
CLIENT_NONCE = bytes(range(24))
SERVER_NONCE = bytes(range(100, 124))


def easy(message: bytes, nonce: bytes, key: bytes = KEY) -> bytes:
    return nacl.bindings.crypto_secretbox_easy(message, nonce, key)


def plus(nonce: bytes, n: int) -> bytes:
    """`nonce` incremented n times, computed without the module under test."""
    return ((int.from_bytes(nonce[:4], "big") + n) % 2**32).to_bytes(4, "big") + nonce[4:]


# ---- constants and keys -----------------------------------------------------------------


def test_sizes_are_those_of_the_libsodium_build() -> None:
    assert (protocol.KEY_SIZE, protocol.NONCE_SIZE, protocol.MAC_SIZE) == (32, 24, 16)
    assert MAX_FRAME == 65535 and MAX_TEXT == 65519
    assert protocol.DEFAULT_SERVER_PORT == 4004
    assert protocol.DEFAULT_CLIENT_ADDRESS == "127.0.0.1:4005"


def test_make_key_command_is_a_config_line_with_32_random_bytes() -> None:
    first, second = protocol.make_key_command(), protocol.make_key_command()
    match = re.fullmatch(r'setKey\("([A-Za-z0-9+/]{43}=)"\)\n', first)
    assert match, first
    assert len(base64.b64decode(match.group(1))) == 32
    assert first != second


@pytest.mark.parametrize(
    "text, expected",
    [
        (base64.b64encode(KEY).decode(), KEY),
        ("  " + base64.b64encode(KEY).decode()[:20] + "\n" + base64.b64encode(KEY).decode()[20:], KEY),
        (base64.b64encode(b"ab").decode().rstrip("="), b"ab"),  # missing padding, as the C++ decoder
        ("", b""),
    ],
)
def test_decode_key_accepts_what_the_cpp_decoder_accepts(text: str, expected: bytes) -> None:
    assert protocol.decode_key(text) == expected


@pytest.mark.parametrize("text", ["!!!", "abc$", "a"])
def test_decode_key_rejects_non_base64_with_the_reference_message(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Unable to decode {text} as Base64")):
        protocol.decode_key(text)


def test_key_problem_names_a_missing_or_short_key() -> None:
    assert protocol.key_problem(KEY) is None
    assert "no console key" in (protocol.key_problem(None) or "")
    assert "16 bytes" in (protocol.key_problem(KEY[:16]) or "")


# ---- nonces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before, after",
    [
        ("00000000", "00000001"),
        ("000000ff", "00000100"),
        ("00ffffff", "01000000"),
        ("fffffffe", "ffffffff"),
        ("ffffffff", "00000000"),  # wraps, the other 20 bytes untouched
    ],
)
def test_increment_is_a_big_endian_counter_in_the_first_four_bytes(before: str, after: str) -> None:
    tail = bytes(range(4, 24))
    assert protocol.increment_nonce(bytes.fromhex(before) + tail) == bytes.fromhex(after) + tail


def test_merged_nonces_follow_reference_9_2() -> None:
    c, s = CLIENT_NONCE, SERVER_NONCE
    client_writes, client_reads = protocol.client_nonces(c, s)
    server_writes, server_reads = protocol.server_nonces(c, s)
    assert client_writes == s[:12] + c[12:] == server_reads
    assert server_writes == c[:12] + s[12:] == client_reads


# ---- messages -----------------------------------------------------------------------------


def test_known_answer_vector() -> None:
    """Fixed key, nonce and text; the ciphertext crypto_secretbox_easy produced for them."""
    channel = Channel(KEY, SERVER_NONCE, CLIENT_NONCE)
    expected = bytes.fromhex("202415348befca8b0666a16666fd0ded71d1f6be6cd3bc9ad9924dbc1e")
    assert channel.seal(b"showVersion()") == len(expected).to_bytes(2, "big") + expected
    empty = bytes.fromhex("f49572d6194281e3c87fbb4e2106932c")
    assert Channel(KEY, SERVER_NONCE, CLIENT_NONCE).seal(b"") == b"\x00\x10" + empty


def test_frames_are_length_prefixed_secretbox_easy_with_incremented_nonces() -> None:
    client = Channel.for_client(KEY, CLIENT_NONCE, SERVER_NONCE)
    writing = SERVER_NONCE[:12] + CLIENT_NONCE[12:]
    for n, text in enumerate([b"showVersion()", b"", "café".encode(), b"x" * MAX_TEXT]):
        ciphertext = easy(text, plus(writing, n))
        assert len(ciphertext) == len(text) + 16
        assert client.seal(text) == len(ciphertext).to_bytes(2, "big") + ciphertext


def test_client_and_server_channels_understand_each_other() -> None:
    client = Channel.for_client(KEY, CLIENT_NONCE, SERVER_NONCE)
    server = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    for n in range(3):
        request = client.seal(f"request {n}".encode())
        assert server.open(request[2:]) == f"request {n}".encode()
        reply = server.seal(f"reply {n}".encode())
        # the reply is what a C++ server would send on its n-th reply
        assert reply[2:] == easy(f"reply {n}".encode(), plus(CLIENT_NONCE[:12] + SERVER_NONCE[12:], n))
        assert client.open(reply[2:]) == f"reply {n}".encode()


def test_a_message_from_another_key_does_not_decrypt() -> None:
    server = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    forged = easy(b"shutdown()", SERVER_NONCE[:12] + CLIENT_NONCE[12:], key=bytes(32))
    with pytest.raises(DecryptError, match="Could not decrypt message"):
        server.open(forged)


def test_a_replayed_message_does_not_decrypt_under_the_next_nonce() -> None:
    client = Channel.for_client(KEY, CLIENT_NONCE, SERVER_NONCE)
    server = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    frame = client.seal(b"addACL('0.0.0.0/0')")
    assert server.open(frame[2:])
    with pytest.raises(DecryptError):
        server.open(frame[2:])


def test_empty_messages_are_authenticated_too() -> None:
    """The C++ code skips the MAC of a 16-byte message; a real empty message has a valid one."""
    server = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    assert server.open(easy(b"", SERVER_NONCE[:12] + CLIENT_NONCE[12:])) == b""
    with pytest.raises(DecryptError):
        Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE).open(bytes(16))
    with pytest.raises(DecryptError, match="shorter than its MAC"):
        Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE).open(bytes(15))


def test_one_frame_carries_at_most_65519_bytes_without_chunking() -> None:
    channel = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    assert len(channel.seal_message(b"x" * MAX_TEXT)) == 2 + MAX_FRAME
    with pytest.raises(MessageTooLong):
        channel.seal_message(b"x" * (MAX_TEXT + 1))


@pytest.mark.parametrize(
    "size, pieces",
    [
        (0, [0]),
        (1, [1]),
        (MAX_TEXT - 1, [MAX_TEXT - 1]),
        (MAX_TEXT, [MAX_TEXT, 0]),
        (MAX_TEXT + 1, [MAX_TEXT, 1]),
        (2 * MAX_TEXT, [MAX_TEXT, MAX_TEXT, 0]),
        (200_000, [MAX_TEXT, MAX_TEXT, MAX_TEXT, 200_000 - 3 * MAX_TEXT]),
    ],
)
def test_chunked_messages_end_with_the_first_frame_that_is_not_full(size: int, pieces: list[int]) -> None:
    text = bytes(i % 251 for i in range(size))
    assert [len(p) for p in protocol.split_text(text)] == pieces
    sender = Channel.for_server(KEY, CLIENT_NONCE, SERVER_NONCE)
    receiver = Channel.for_client(KEY, CLIENT_NONCE, SERVER_NONCE)
    sender.chunked = True
    data = sender.seal_message(text)
    received, offset = [], 0
    while True:  # read as a client does: frame after frame until one is not full
        length = protocol.frame_length(data[offset : offset + 2])
        assert length <= MAX_FRAME
        piece = receiver.open(data[offset + 2 : offset + 2 + length])
        offset += 2 + length
        received.append(piece)
        if len(piece) < MAX_TEXT:
            break
    assert offset == len(data) and b"".join(received) == text


def test_too_long_reply_message_is_clear_and_fits_one_frame() -> None:
    text = protocol.too_long_reply(200_000)
    assert text.startswith("Error: reply of 200000 bytes is longer than the console protocol allows")
    assert len(text.encode()) < MAX_TEXT


def test_hello_is_a_lua_comment_the_cpp_daemon_runs_as_a_no_op() -> None:
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaState, StateKind

    assert LuaState(StateKind.CONFIG, Host()).execute(protocol.HELLO) == ()


# ---- the crypto self-test and the event log summary ---------------------------------------


def test_crypto_works_only_with_a_32_byte_key() -> None:
    assert crypto_works(KEY, b"hello")
    assert crypto_works(KEY, b"")
    assert not crypto_works(KEY[:31], b"hello")
    assert not crypto_works(None, b"hello")


def test_eventlog_summary_format() -> None:
    text = format_eventlog_summary({
        "backend": "sqlite", "location": "/var/lib/trackalert/events.db", "events": 3,
        "first_seq": 5, "last_seq": 7, "oldest_received": 0.0, "newest_received": 86400.5,
        "size_bytes": 3 * 1024 * 1024, "lag_events": 2, "lag_seconds": 1.25,
        "retention_seconds": 400 * 86400,
    })
    assert text == (
        "Backend:      sqlite\n"
        "Location:     /var/lib/trackalert/events.db\n"
        "Events:       3 (seq 5 to 7)\n"
        "Size:         3.0 MiB (3145728 bytes)\n"
        "Oldest event: 1970-01-01 00:00:00 UTC\n"
        "Newest event: 1970-01-02 00:00:00 UTC\n"
        "Retention:    400d\n"
        "Policy lag:   2 events, 1.2 s\n"
    )
