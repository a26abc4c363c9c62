"""The record layer and key schedule against published vectors and the RFCs' rules."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from dm_actor.dtls.errors import DecodeError
from dm_actor.dtls.prf import key_block, prf, psk_premaster
from dm_actor.dtls.record import (
    DTLS_1_2,
    ContentType,
    open_record,
    plaintext_record,
    replay_fresh,
    replay_mark,
    seal,
    split_records,
)


def test_prf_sha256_known_answer() -> None:
    # The TLS 1.2 PRF (SHA-256) vector posted to the IETF TLS list and used by many stacks.
    secret = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
    seed = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
    expected = bytes.fromhex(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )
    assert prf(secret, b"test label", seed, 100) == expected
    assert prf(secret, b"test label", seed, 7) == expected[:7]


def test_aes_ccm_8_nist_sp800_38c_example_3() -> None:
    # NIST SP 800-38C Appendix C.3: Tlen = 64 (CCM_8), Nlen = 96 (the DTLS nonce length).
    key = bytes.fromhex("404142434445464748494a4b4c4d4e4f")
    nonce = bytes.fromhex("101112131415161718191a1b")
    aad = bytes.fromhex("000102030405060708090a0b0c0d0e0f10111213")
    plaintext = bytes.fromhex("202122232425262728292a2b2c2d2e2f3031323334353637")
    expected = bytes.fromhex("e3b201a9f5b71a7a9b1ceaeccd97e70b6176aad9a4428aa5484392fbc1b09951")
    assert AESCCM(key, tag_length=8).encrypt(nonce, plaintext, aad) == expected


def test_psk_premaster_is_rfc_4279_layout() -> None:
    assert psk_premaster(b"\xaa\xbb") == b"\x00\x02\x00\x00\x00\x02\xaa\xbb"


def test_key_block_splits_40_bytes_in_rfc_5246_order() -> None:
    master = bytes(48)
    block = prf(master, b"key expansion", b"S" * 32 + b"C" * 32, 40)
    keys = key_block(master, b"C" * 32, b"S" * 32)
    assert keys.client_key + keys.server_key + keys.client_iv + keys.server_iv == block


def test_seal_uses_the_rfc_6655_nonce_and_rfc_5246_aad() -> None:
    key, iv = bytes(range(16)), b"\x01\x02\x03\x04"
    record = seal(key, iv, ContentType.APPLICATION_DATA, 1, 5, b"payload")
    header = record[:13]
    assert header == b"\x17\xfe\xfd" + b"\x00\x01" + (5).to_bytes(6, "big") + (8 + 7 + 8).to_bytes(
        2, "big"
    )
    explicit = record[13:21]
    assert explicit == b"\x00\x01" + (5).to_bytes(6, "big")
    aad = explicit + b"\x17\xfe\xfd" + (7).to_bytes(2, "big")
    assert AESCCM(key, tag_length=8).decrypt(iv + explicit, record[21:], aad) == b"payload"
    (parsed,), bad = split_records(record, 0)
    assert not bad
    assert open_record(key, iv, parsed) == (ContentType.APPLICATION_DATA, b"payload")


def test_cid_record_hides_the_real_type_and_authenticates_the_cid() -> None:
    key, iv, cid = bytes(16), bytes(4), b"\xc1\xd0"
    record = seal(key, iv, ContentType.ALERT, 1, 9, b"\x01\x00", cid)
    assert record[0] == ContentType.TLS12_CID and record[11:13] == cid
    (parsed,), _ = split_records(record, len(cid))
    assert parsed.cid == cid
    assert open_record(key, iv, parsed) == (ContentType.ALERT, b"\x01\x00")
    forged = record[:11] + b"\xc1\xd1" + record[13:]
    (bad_cid,), _ = split_records(forged, len(cid))
    with pytest.raises(DecodeError):
        open_record(key, iv, bad_cid)


def test_every_flipped_byte_fails_authentication() -> None:
    key, iv = bytes(16), bytes(4)
    record = seal(key, iv, ContentType.APPLICATION_DATA, 1, 0, b"abc")
    for i in range(len(record)):
        mutated = bytearray(record)
        mutated[i] ^= 0x40
        records, _ = split_records(bytes(mutated), 0)
        for parsed in records:
            with pytest.raises(DecodeError):
                open_record(key, iv, parsed)


def test_several_records_per_datagram_and_truncation() -> None:
    one = plaintext_record(ContentType.HANDSHAKE, 0, 1, b"abc")
    two = plaintext_record(ContentType.ALERT, 0, 2, b"\x02\x28")
    records, bad = split_records(one + two, 0)
    assert [r.seq for r in records] == [1, 2] and not bad
    assert records[1].fragment == b"\x02\x28" and records[0].version == DTLS_1_2
    records, bad = split_records(one + two[:-1], 0)
    assert [r.seq for r in records] == [1] and bad
    records, bad = split_records(one[:5], 0)
    assert records == [] and bad
    # An absurd length field (65535) is a truncated record, not an allocation.
    records, bad = split_records(one[:11] + b"\xff\xff" + b"x" * 10, 0)
    assert records == [] and bad
    # An unknown version is skipped, the rest of the datagram still read.
    alien = b"\x16\x03\x03" + one[3:]
    records, bad = split_records(alien + two, 0)
    assert [r.seq for r in records] == [2] and bad


def test_replay_window_rfc_6347_4_1_2_6() -> None:
    highest, window = -1, 0
    for seq in (0, 1, 5, 3, 70):
        assert replay_fresh(highest, window, seq)
        highest, window = replay_mark(highest, window, seq)
    assert highest == 70
    for seq in (70, 5, 3, 0, 1):
        assert not replay_fresh(highest, window, seq)  # seen, or left the window (0..6)
    assert replay_fresh(highest, window, 69)  # inside the window, never seen
    assert not replay_fresh(highest, window, 70 - 64)  # just left the window
    assert replay_fresh(highest, window, 70 - 63)
    highest, window = replay_mark(highest, window, 1000)  # a jump past the window resets it
    assert window == 1 and replay_fresh(highest, window, 999)
