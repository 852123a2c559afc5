"""The console wire protocol of the C++ daemon's libsodium build (reference §9.1, §9.2), pure.

Both ends must agree on every byte, or the C++ client and ours stop being interchangeable:

* XSalsa20-Poly1305 (`crypto_secretbox_easy`) with the 32-byte key of `setKey()`; the bytes on the
  wire are MAC ‖ encrypted text, which is PyNaCl's `SecretBox.encrypt(...).ciphertext`.
* The client sends its random 24-byte nonce C, the server answers with its nonce S. With h = 12,
  client→server messages use S[:h] ‖ C[h:] and server→client messages C[:h] ‖ S[h:].
* After every encryption or decryption the nonce in use is incremented: its first 4 bytes are a
  big-endian 32-bit counter (wrapping), the other 20 bytes never change.
* A message is a 2-byte big-endian length followed by that many bytes of ciphertext, so one frame
  carries at most 65535 - 16 = 65519 bytes of text.

Our one extension, for replies (and requests) longer than one frame, is negotiated so the C++
peers never see it: see `HELLO`. Nothing here does I/O; the server and the client frame with it.

One deliberate difference: the C++ code returns "" for a 16-byte message without checking its
MAC. Every legitimate sender — the C++ one included — sends the valid MAC of the empty text there,
so we authenticate it like any other message: a peer without the key cannot slip even an empty
command through.
"""

from __future__ import annotations

import base64
import binascii

import nacl.exceptions
import nacl.secret
import nacl.utils

KEY_SIZE = nacl.secret.SecretBox.KEY_SIZE  # 32
NONCE_SIZE = nacl.secret.SecretBox.NONCE_SIZE  # 24
MAC_SIZE = nacl.secret.SecretBox.MACBYTES  # 16
LENGTH_SIZE = 2
MAX_FRAME = 0xFFFF
#: The most text one frame carries.
MAX_TEXT = MAX_FRAME - MAC_SIZE
#: Default port of `controlSocket(address)` when the address has none (the C++ server's).
DEFAULT_SERVER_PORT = 4004
#: Where a client connects when its config has no `controlSocket` (the C++ client's default).
DEFAULT_CLIENT_ADDRESS = "127.0.0.1:4005"

#: Our client's first command on a connection. A Lua comment, so a C++ daemon runs it as a no-op
#: and answers "" — the C++ client never sends it. Our server answers `HELLO_REPLY` instead and
#: from then on, on that connection only, a message longer than `MAX_TEXT` travels as a run of
#: full frames (exactly `MAX_TEXT` bytes of text each) ended by a shorter, possibly empty, frame.
HELLO = "-- trackalert-client: chunked-replies"
HELLO_REPLY = "-- trackalert-server: chunked-replies"


class ProtocolError(Exception):
    """The peer broke the protocol (or has another key); the connection is unusable."""


class DecryptError(ProtocolError):
    """A message failed to authenticate: wrong key, or corrupted on the way."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("Could not decrypt message" + (f" ({detail})" if detail else ""))


class MessageTooLong(ValueError):
    """Text that one frame cannot carry, on a connection that did not negotiate chunking."""


# ---- keys ---------------------------------------------------------------------------------


def make_key() -> bytes:
    return nacl.utils.random(KEY_SIZE)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode a `setKey()` argument; ValueError when it is not Base64.

    Whitespace is ignored and missing padding tolerated, as the C++ decoder does.
    """
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"Unable to decode {text} as Base64") from exc


def make_key_command() -> str:
    """What `makeKey()` outputs: a config line with a fresh key."""
    return f'setKey("{encode_key(make_key())}")\n'


def key_problem(key: bytes | None) -> str | None:
    """Why `key` cannot encrypt the console, or None when it can."""
    if key is None:
        return "no console key is set (setKey)"
    if len(key) != KEY_SIZE:
        return f"the console key is {len(key)} bytes long, it must be {KEY_SIZE} (make one with makeKey())"
    return None


# ---- nonces -------------------------------------------------------------------------------


def random_nonce() -> bytes:
    return nacl.utils.random(NONCE_SIZE)


def increment_nonce(nonce: bytes) -> bytes:
    """The next nonce: the first 4 bytes as a big-endian counter plus one, wrapping at 2**32."""
    counter = (int.from_bytes(nonce[:4], "big") + 1) & 0xFFFFFFFF
    return counter.to_bytes(4, "big") + nonce[4:]


def merge_nonces(lower: bytes, higher: bytes) -> bytes:
    """The first half of `lower` with the second half of `higher` (C++ `SodiumNonce::merge`)."""
    half = len(lower) // 2
    return lower[:half] + higher[half:]


def client_nonces(client: bytes, server: bytes) -> tuple[bytes, bytes]:
    """(writing, reading) nonces of the client, given both random nonces."""
    return merge_nonces(server, client), merge_nonces(client, server)


def server_nonces(client: bytes, server: bytes) -> tuple[bytes, bytes]:
    """(writing, reading) nonces of the server, given both random nonces."""
    return merge_nonces(client, server), merge_nonces(server, client)


# ---- messages -----------------------------------------------------------------------------


def encrypt(box: nacl.secret.SecretBox, text: bytes, nonce: bytes) -> bytes:
    """MAC ‖ encrypted `text`, exactly what `crypto_secretbox_easy` writes."""
    return box.encrypt(text, nonce).ciphertext


def decrypt(box: nacl.secret.SecretBox, ciphertext: bytes, nonce: bytes) -> bytes:
    if len(ciphertext) < MAC_SIZE:
        raise DecryptError(f"a message of {len(ciphertext)} bytes is shorter than its MAC")
    try:
        return box.decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        raise DecryptError() from None


def frame(ciphertext: bytes) -> bytes:
    """The length prefix and the ciphertext."""
    if len(ciphertext) > MAX_FRAME:
        raise MessageTooLong(f"a frame carries at most {MAX_FRAME} bytes, not {len(ciphertext)}")
    return len(ciphertext).to_bytes(LENGTH_SIZE, "big") + ciphertext


def frame_length(prefix: bytes) -> int:
    """The ciphertext length announced by a 2-byte prefix."""
    return int.from_bytes(prefix, "big")


def split_text(text: bytes) -> list[bytes]:
    """Chunked form: full pieces of `MAX_TEXT` bytes, then one shorter (possibly empty) piece,
    so the reader knows the message ends at the first piece that is not full."""
    pieces = [text[i : i + MAX_TEXT] for i in range(0, len(text) - len(text) % MAX_TEXT, MAX_TEXT)]
    pieces.append(text[len(pieces) * MAX_TEXT :])
    return pieces


def too_long_reply(size: int) -> str:
    """What a peer that cannot take chunked messages (the C++ client) gets instead of a long reply."""
    return (
        f"Error: reply of {size} bytes is longer than the console protocol allows ({MAX_TEXT} "
        "bytes per message); trackalert's own client (trackalert -c / -e) receives long replies\n"
    )


class Channel:
    """One end of a connection after the nonce exchange: seals outgoing text into frames and opens
    incoming ciphertext, each direction with its own nonce, incremented after every message."""

    def __init__(self, key: bytes, writing_nonce: bytes, reading_nonce: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)
        self.writing_nonce = writing_nonce
        self.reading_nonce = reading_nonce
        #: Whether messages longer than one frame are split (negotiated with `HELLO`).
        self.chunked = False

    @classmethod
    def for_client(cls, key: bytes, client_nonce: bytes, server_nonce: bytes) -> "Channel":
        return cls(key, *client_nonces(client_nonce, server_nonce))

    @classmethod
    def for_server(cls, key: bytes, client_nonce: bytes, server_nonce: bytes) -> "Channel":
        return cls(key, *server_nonces(client_nonce, server_nonce))

    def seal(self, text: bytes) -> bytes:
        """One frame (length prefix included) carrying `text`, at most `MAX_TEXT` bytes."""
        if len(text) > MAX_TEXT:
            raise MessageTooLong(f"{len(text)} bytes do not fit in one frame ({MAX_TEXT} at most)")
        ciphertext = encrypt(self._box, text, self.writing_nonce)
        self.writing_nonce = increment_nonce(self.writing_nonce)
        return frame(ciphertext)

    def seal_message(self, text: bytes) -> bytes:
        """All the frames of one message: one frame, or the chunked run when negotiated."""
        if not self.chunked:
            return self.seal(text)
        return b"".join(self.seal(piece) for piece in split_text(text))

    def open(self, ciphertext: bytes) -> bytes:
        text = decrypt(self._box, ciphertext, self.reading_nonce)
        self.reading_nonce = increment_nonce(self.reading_nonce)
        return text
