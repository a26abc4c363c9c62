"""Interop: every UDP datagram captured from real LwM2M clients decodes and re-encodes exactly.

The vectors (tests/vectors/*.jsonl) were produced by Wakaama, Anjay, libcoap and the servers
they talked to. Each datagram is its own test case, named `file:line`, so a failure names the
datagram. The human-decoded .txt files are parsed too and every datagram is checked against its
line there (type, code, Message ID, token, options, payload), plus hand-written spot checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dm_actor.coap.message import Message, check_options, decode, encode
from dm_actor.coap.numbers import Code, MessageType, OptionNumber, code_str

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def _udp_files() -> list[Path]:
    files = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        with path.open() as f:
            if json.loads(f.readline())["transport"] == "udp":
                files.append(path)
    return files


UDP_FILES = _udp_files()


def _records(path: Path) -> list[dict[str, object]]:
    """The datagram records of a .jsonl file (the header line dropped), in file order."""
    return [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]


def _datagram_cases() -> list[object]:
    cases: list[object] = []
    for path in UDP_FILES:
        for line, rec in enumerate(_records(path), start=2):
            cases.append(pytest.param(bytes.fromhex(str(rec["hex"])), id=f"{path.stem}:{line}"))
    return cases


def datagram(stem: str, line: int) -> bytes:
    """The datagram on 1-based `line` of tests/vectors/`stem`.jsonl (line 1 is the header)."""
    rec = json.loads((VECTORS / f"{stem}.jsonl").read_text().splitlines()[line - 1])
    return bytes.fromhex(rec["hex"])


def test_vectors_are_present() -> None:
    assert len(UDP_FILES) >= 5
    assert sum(len(_records(p)) for p in UDP_FILES) >= 140


@pytest.mark.parametrize("data", _datagram_cases())
def test_datagram_round_trips(data: bytes) -> None:
    msg = decode(data)
    check_options(msg)
    assert encode(msg) == data
    assert list(msg.options) == sorted(msg.options, key=lambda o: o[0])


# -- every datagram against its human-decoded line ------------------------------------------

_TXT_LINE = re.compile(
    r"t=\s*(?P<t>[\d.]+)\s+(?P<src>\d+)->(?P<dst>\d+)\s+(?P<type>CON|NON|ACK|RST) (?P<code>\S+) "
    r"mid=(?P<mid>\d+) tok=(?P<tok>[0-9a-f]*) ?(?P<rest>.*)$"
)
_TYPES = {"CON": MessageType.CON, "NON": MessageType.NON, "ACK": MessageType.ACK}
_UINT_OPTIONS = {
    "Content-Format": OptionNumber.CONTENT_FORMAT,
    "Accept": OptionNumber.ACCEPT,
    "Observe": OptionNumber.OBSERVE,
}
_STRING_OPTIONS = {
    "Uri-Path": (OptionNumber.URI_PATH, "/"),
    "Location-Path": (OptionNumber.LOCATION_PATH, "/"),
    "Uri-Query": (OptionNumber.URI_QUERY, "&"),
}


def _txt_cases() -> list[object]:
    cases: list[object] = []
    for path in UDP_FILES:
        txt = path.with_suffix(".txt")
        if not txt.exists():
            continue
        lines = [ln for ln in txt.read_text().splitlines() if ln and "[inside ICMP" not in ln]
        records = _records(path)
        assert len(lines) == len(records), path.name
        for n, (ln, rec) in enumerate(zip(lines, records, strict=True), start=2):
            cases.append(pytest.param(ln, rec, id=f"{path.stem}:{n}"))
    return cases


def _check_option_text(msg: Message, name: str, value: str) -> None:
    if name in _UINT_OPTIONS:
        assert msg.uint_option(_UINT_OPTIONS[name]) == int(value.split("(")[0]), name
    else:
        number, sep = _STRING_OPTIONS[name]
        values = [v.decode() for v in msg.option_values(number)]
        assert sep.join(values) == value, name


@pytest.mark.parametrize(("line", "rec"), _txt_cases())
def test_datagram_matches_txt(line: str, rec: dict[str, object]) -> None:
    m = _TXT_LINE.match(line)
    assert m is not None, line
    assert float(m["t"]) == pytest.approx(float(str(rec["t"])), abs=0.001)
    assert (int(m["src"]), int(m["dst"])) == (rec["src_port"], rec["dst_port"])
    msg = decode(bytes.fromhex(str(rec["hex"])))
    assert msg.mtype == _TYPES[m["type"]]
    code = m["code"]
    assert code_str(msg.code) == code if "." in code else msg.code == Code[code]
    assert msg.mid == int(m["mid"])
    assert msg.token.hex() == m["tok"]
    rest, _, payload_text = m["rest"].partition("payload")
    named = set(_UINT_OPTIONS) | set(_STRING_OPTIONS)
    seen = set()
    for item in rest.split():
        name, _, value = item.partition("=")
        assert name in named, item
        _check_option_text(msg, name, value)
        seen.add(name)
    # an option the .txt does not list is absent from the datagram too
    for name in named - seen:
        number = _UINT_OPTIONS.get(name) or _STRING_OPTIONS[name][0]
        assert msg.option(number) is None, name
    if not payload_text:
        assert msg.payload == b""
    elif payload_text.startswith("["):  # payload[NB]=0x<hex prefix>
        size, _, hex_prefix = payload_text[1:].partition("B]=0x")
        assert len(msg.payload) == int(size)
        assert msg.payload.hex().startswith(hex_prefix)
    else:
        # long text payloads are cut in the .txt (sometimes marked with "...")
        text = payload_text.removeprefix("=").removesuffix("...")
        assert text
        assert msg.payload.decode().startswith(text)


# -- spot checks ----------------------------------------------------------------------------


def test_wakaama_register() -> None:
    msg = decode(datagram("wakaama-client-udp", 2))
    assert msg.mtype == MessageType.CON
    assert msg.code == Code.POST
    assert msg.mid == 38193
    assert msg.token == bytes.fromhex("3195adad")
    assert msg.uri_path == ("rd",)
    assert msg.content_format == 40
    assert msg.uri_query == ("lwm2m=1.1", "ep=wk-trace-wakaama", "b=U", "lt=20")
    assert msg.payload.startswith(b'</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,')
    assert msg.payload.endswith(b",</31024/12>")
    assert msg.observe is None
    assert msg.max_age == 60


def test_wakaama_register_reply_has_location_path() -> None:
    msg = decode(datagram("wakaama-client-udp", 3))
    assert (msg.mtype, msg.code, msg.mid) == (MessageType.ACK, Code.CREATED, 38193)
    assert msg.token == bytes.fromhex("3195adad")
    assert msg.location_path == ("rd", "0")
    assert msg.options == ((OptionNumber.LOCATION_PATH, b"rd"), (OptionNumber.LOCATION_PATH, b"0"))
    assert msg.payload == b""


def test_wakaama_observe_notification() -> None:
    msg = decode(datagram("wakaama-client-udp", 22))
    assert (msg.mtype, msg.code, msg.mid) == (MessageType.NON, Code.CONTENT, 38195)
    assert msg.token == bytes.fromhex("00000001")
    assert msg.observe == 1
    assert msg.content_format == 110
    assert msg.payload == b'[{"bn":"/3/0/9","v":77}]'


def test_wakaama_observe_register_has_zero_length_observe() -> None:
    msg = decode(datagram("wakaama-client-udp", 20))
    assert (msg.mtype, msg.code, msg.mid) == (MessageType.CON, Code.GET, 33819)
    assert msg.option(OptionNumber.OBSERVE) == b""  # Observe=0 is the empty uint
    assert msg.observe == 0
    assert msg.uri_path == ("3", "0", "9")
    assert msg.accept == 110


def test_libcoap_uri_port() -> None:
    msg = decode(datagram("libcoap-client", 2))
    assert (msg.mtype, msg.code, msg.mid) == (MessageType.CON, Code.POST, 0xF836)
    assert msg.token == b"\x01"
    assert msg.uint_option(OptionNumber.URI_PORT) == 5700
    assert msg.options[0] == (OptionNumber.URI_PORT, b"\x16\x44")
    assert msg.uri_path == ("rd",)
    assert msg.content_format == 40
    assert msg.uri_query == ("ep=x", "b=U", "lt=60")
    reply = decode(datagram("libcoap-client", 3))
    assert (reply.mtype, reply.code, reply.mid) == (MessageType.ACK, Code.CREATED, 0xF836)
    assert reply.location_path == ("rd", "f836-994")


def test_anjay_4_12_answer() -> None:
    register = decode(datagram("anjay-client-udp", 2))
    assert "lwm2m=1.2" in register.uri_query
    answer = decode(datagram("anjay-client-udp", 3))
    assert (answer.mtype, answer.code, answer.mid) == (
        MessageType.ACK,
        Code.PRECONDITION_FAILED,
        5634,
    )
    assert code_str(answer.code) == "4.12"
    assert answer.token == bytes.fromhex("6f6819cce2bde086") == register.token
    assert answer.options == ()
    assert answer.payload == b""
    retry = decode(datagram("anjay-client-udp", 4))
    assert "lwm2m=1.1" in retry.uri_query
    assert retry.mid == 5635
