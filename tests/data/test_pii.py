"""PII masking on literal strings: every kind is masked, every look-alike survives."""

import pytest

from pipeline.data.pii import find_pii, luhn_valid, mask_pii
from pipeline.data.pii_scan import iban_valid, pii_left, rrn_check_digit, scan_pii

MASKED = [
    ("write to jane.doe+news@example.co.uk today", "write to <EMAIL> today", "email"),
    ("문의: 홍길동@회사.kr 아님, kim.minsu@naver.com 으로", "문의: 홍길동@회사.kr 아님, <EMAIL> 으로", "email"),
    ("휴대폰 010-1234-5678 로 연락", "휴대폰 <PHONE> 로 연락", "phone"),
    ("call +82 10 1234 5678 now", "call <PHONE> now", "phone"),
    ("+82-10-9876-5432", "<PHONE>", "phone"),
    ("서울 사무실 02-123-4567", "서울 사무실 <PHONE>", "phone"),
    ("부산 051-234-5678 지점", "부산 <PHONE> 지점", "phone"),
    ("US office (415) 555-2671", "US office <PHONE>", "phone"),
    ("주민등록번호 900101-1234567", "주민등록번호 <KR_RRN>", "kr_rrn"),
    ("visa 4111 1111 1111 1111 exp", "visa <CARD> exp", "card"),
    ("mc 5555-5555-5555-4444", "mc <CARD>", "card"),
    ("amex 378282246310005.", "amex <CARD>.", "card"),
    ("host 8.8.4.4 answered", "host <IP> answered", "ip"),
    ("peer 2607:f8b0:4005:80b::200e up", "peer <IP> up", "ip"),
    ("IBAN GB82 WEST 1234 5698 7654 32 please", "IBAN <IBAN> please", "iban"),
    ("계좌번호: 110-123-456789 (신한)", "계좌번호: <BANK_ACCOUNT> (신한)", "bank_account"),
    # a Korean particle written right after the value
    ("번호는 010-2345-6789로 연락", "번호는 <PHONE>로 연락", "phone"),
    ("전화번호는010-9876-5432입니다", "전화번호는<PHONE>입니다", "phone"),
    ("카드 4111 1111 1111 1111로 결제", "카드 <CARD>로 결제", "card"),
    ("서버 8.8.8.8에서 접속", "서버 <IP>에서 접속", "ip"),
    ("주소 2607:f8b0:4005:80b::200e에서", "주소 <IP>에서", "ip"),
    ("메일 kim.minsu@naver.com으로 보내", "메일 <EMAIL>으로 보내", "email"),
    ("등록번호 850315-1234566을 입력", "등록번호 <KR_RRN>을 입력", "kr_rrn"),
    ("IBAN GB82 WEST 1234 5698 7654 32로 송금", "IBAN <IBAN>로 송금", "iban"),
    # number forms: spaces, no separators, parentheses, no dash, dots
    ("휴대폰 010 3456 7890 입니다", "휴대폰 <PHONE> 입니다", "phone"),
    ("연락처 01045678901 낮에만", "연락처 <PHONE> 낮에만", "phone"),
    ("+821098765432 abroad", "<PHONE> abroad", "phone"),
    ("대표 (02) 555-1234 번", "대표 <PHONE> 번", "phone"),
    ("지점 031)234-5678 문의", "지점 <PHONE> 문의", "phone"),
    ("desk 415.555.2671 today", "desk <PHONE> today", "phone"),
    ("주민번호 9207042234569 확인", "주민번호 <KR_RRN> 확인", "kr_rrn"),
    # in the legal prose of the Korean corpus: inside a remark's brackets
    ("신청인 주민등록번호(780512-1234568)를 기재", "신청인 주민등록번호(<KR_RRN>)를 기재", "kr_rrn"),
    ("입법조사관 (02-788-1234, 내선 없음)", "입법조사관 (<PHONE>, 내선 없음)", "phone"),
]


@pytest.mark.parametrize(("text", "expected", "kind"), MASKED)
def test_masks_each_kind(text, expected, kind):
    masked, counts = mask_pii(text)
    assert masked == expected
    assert counts[kind] == 1


SURVIVE = [
    "Python 3.11.7 was released; see version 1.2.3.4 and pkg==2.0.1.3",
    "released on 2025-08-09 at 12:30:45",
    "mask = 0xDEADBEEF; addr = 0x7ffd5e8c",
    "server.listen(port=8080); url = 'http://localhost:8000/'",
    "x = 1234567890123456  # fails Luhn",
    "ids = [4111111111111112, 5555555555554445]",
    "bind 127.0.0.1 and 10.0.0.1 and 192.168.1.20, docs use 2001:db8::1 and ::1",
    "a[1::2] and std::vector<int> and b[::3]",
    "numpy 1.26.4, torch 2.13.0, sizes 32000 x 768",
    "decorators like @property and @functools.cache are not e-mail",
    "ISBN 978-3-16-148410-0 and order 2024-0001-2345",
    "123456-1234567 has no real birth date (month 34)",
    "버전 3.11.7로 올렸고 2025.08.09에 배포, 포트 8080에서",
    "주문번호 2024-0815-1234로 조회, 좌표 (37.5665, 126.9780)에서",
    "타임스탬프 1700000000000을 변환; 8501011234560 fails the check digit",
    "id 4111111111111112로 시작; version 1.2.3.4로 고정; 555.123.4567.8",
    "Decimal('0.333333333') and 0.624499800 and 0.64524308",
    # the numbers of Korean legal prose: dates, article, bill and law numbers, amounts
    "발의연월일 : 2010.  11.  12.  의안번호 9890, 제63조제2항제4호 중 “만 6세 이하”를",
    "부칙 <헌법 제10호, 1987.10.29.> 1988년 2월 25일부터 시행; 경비 13,710 백만원 (’10. 12. 31. 기준)",
    "법률 제10134호, 시행일 2011-01-01, 의안번호 1809890, 재적의원 299인 중 150인",
    # Luhn-valid constants of the standard library's hash tests, but no issuer starts with 57
    "self.assertEqual(hash(x), 573763426263223372) and (5749986484189612790, 'x')",
]


@pytest.mark.parametrize("text", SURVIVE)
def test_look_alikes_survive(text):
    masked, counts = mask_pii(text)
    assert masked == text, f"masked {dict(counts)}"
    assert find_pii(text) == []
    assert scan_pii(text) == []


@pytest.mark.parametrize(("text", "expected", "kind"), MASKED)
def test_the_scanner_finds_each_kind_and_nothing_once_masked(text, expected, kind):
    assert [k for k, _ in scan_pii(text)] == [kind]
    assert pii_left(mask_pii(text)[0]) == []


def test_the_check_sees_a_blind_spot_of_the_patterns(monkeypatch):
    """Give the masker a blind spot (no phone rule): what it leaves, the scanner still reports."""
    from pipeline.data import pii

    monkeypatch.setattr(pii, "RULES", tuple(r for r in pii.RULES if r.kind != "phone"))
    masked, _ = mask_pii("mail kim@naver.com, call 010-2345-6789로")
    assert masked == "mail <EMAIL>, call 010-2345-6789로"
    assert pii_left(masked) == [("scanner", "phone", "010-2345-6789")]


def test_checksums():
    assert rrn_check_digit("8503151234566")
    assert not rrn_check_digit("8503151234567")
    assert iban_valid("GB82WEST12345698765432")
    assert not iban_valid("GB82WEST12345698765433")


def test_labelled_set_per_kind():
    """Both detectors on data/pii_labelled.jsonl: every labelled span found, no look-alike flagged."""
    import json
    from collections import Counter
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "data" / "pii_labelled.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert sum(bool(r["pii"]) for r in rows) >= 40
    assert sum(not r["pii"] for r in rows) >= 30
    for finder in (find_pii, scan_pii):
        missed, extra = Counter(), Counter()
        for row in rows:
            gold, found = Counter(map(tuple, row["pii"])), Counter(finder(row["text"]))
            missed.update(k for k, _ in (gold - found).elements())
            extra.update(k for k, _ in (found - gold).elements())
        assert not missed, (finder.__name__, dict(missed), dict(extra))
        assert not extra, (finder.__name__, dict(missed), dict(extra))


def test_counts_several_kinds_in_one_document():
    text = "mail a@b.io or c@d.io, phone 010-2222-3333, card 4012 8888 8888 1881"
    masked, counts = mask_pii(text)
    assert counts == {"email": 2, "phone": 1, "card": 1}
    assert find_pii(masked) == []


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
