"""PII masking on literal strings: every kind is masked, every look-alike survives."""

import pytest

from pipeline.data.pii import find_pii, luhn_valid, mask_pii

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
]


@pytest.mark.parametrize("text,expected,kind", MASKED)
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
]


@pytest.mark.parametrize("text", SURVIVE)
def test_look_alikes_survive(text):
    masked, counts = mask_pii(text)
    assert masked == text, f"masked {dict(counts)}"
    assert find_pii(text) == []


def test_counts_several_kinds_in_one_document():
    text = "mail a@b.io or c@d.io, phone 010-2222-3333, card 4012 8888 8888 1881"
    masked, counts = mask_pii(text)
    assert counts == {"email": 2, "phone": 1, "card": 1}
    assert find_pii(masked) == []


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
