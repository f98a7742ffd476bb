"""PII masking for English and Korean text and for code.

Each kind of personal data is one regular expression plus, where the pattern alone is
ambiguous, a validator (Luhn for cards, mod-97 for IBANs, a real date for resident
registration numbers, `ipaddress` for IPs). The validators are what let look-alikes survive:
version strings (3.11.7), dates (2025-08-09), hex literals, port numbers and digit runs in
code that fail Luhn are not personal data and must stay as they are.

Masks are fixed placeholders so that a model trained on the corpus learns the slot, not the
value: <EMAIL>, <PHONE>, <KR_RRN>, <CARD>, <IP>, <IBAN>, <BANK_ACCOUNT>.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

# Every pattern is compiled with re.ASCII: its boundaries (\w, \d) are ASCII only, so a Korean
# particle written right after a number or address (010-1234-5678로, 8.8.8.8에서) ends the match
# instead of hiding it, as Hangul would otherwise count as a word character.

# E-mail: local part, @, a domain with at least one dot and an alphabetic TLD.
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])", re.ASCII)

# Korean resident registration number: YYMMDD-GNNNNNN, G in 1..8 (century and sex; 5..8 for
# foreign residents), the dash optional. The date part (and, without the dash, the check digit)
# is checked below, so 123456-1234567 style noise survives.
_KR_RRN = re.compile(r"(?<![\d-])(\d{2})(\d{2})(\d{2})-?([1-8])\d{6}(?![\d-])", re.ASCII)

# Card numbers: 13-19 digits, either contiguous or in groups split by single spaces or dashes.
_CARD = re.compile(r"(?<![\w.-])(?:\d[ -]?){12,18}\d(?![\w-]|\.\d)", re.ASCII)

# Phone numbers. Korean forms first: mobile 010/011/016-019, Seoul 02, regional 031-064,
# national 070/080, with optional +82 country code (which drops the leading 0). Then the North
# American form. Separators are required between groups (one kind per number) so that plain
# digit runs and dates (2025-08-09: four-digit first group) never match; the exceptions are
# Korean mobile numbers, whose 010 prefix is distinctive enough to be found written solid.
_KR_AREA = r"(?:1[016789]|2|[3-6][1-5]|70|80)"
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    rf"\+82[ -]?{_KR_AREA}([ -])\d{{3,4}}\1\d{{4}}"  # +82 10 1234 5678
    r"|\+82[ -]?1[016789]\d{7,8}"  # +821012345678
    rf"|0{_KR_AREA}([-. ])\d{{3,4}}\2\d{{4}}"  # 010-1234-5678, 02 123 4567, 010.1234.5678
    rf"|\(0{_KR_AREA}\)[ ]?\d{{3,4}}[- ]\d{{4}}"  # (02) 123-4567
    rf"|0{_KR_AREA}\)[ ]?\d{{3,4}}-\d{{4}}"  # 02)123-4567
    r"|01[016789]\d{7,8}"  # 01012345678
    r"|(?:\+1[ -]?)?\(\d{3}\)[ ]?\d{3}[- ]\d{4}"  # (555) 123-4567
    r"|\+1[ -]?\d{3}([ -.])\d{3}\3\d{4}"  # +1 555 123 4567
    r"|\+1\d{10}"  # +15552345678
    r"|[2-9]\d{2}([-.])[2-9]\d{2}\4\d{4}"  # 555-234-5678, 555.234.5678
    r")(?![\w-]|\.\d)",
    re.ASCII,
)

# IPv4 as four dotted octets; IPv6 as hex groups with colons. Both are validated with the
# standard library and only globally routable addresses are masked: loopback, private and
# documentation ranges (127.0.0.1, 10.0.0.0/8, 2001:db8::/32) are configuration, not personal
# data, and code is full of them (the same rule as the StarCoder PII pipeline).
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.\w)", re.ASCII)
# A version string like "version 1.2.3.4" or "v1.2.3.4" is not an address.
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver\.?)\s*|\bv|(?:==|>=|<=|~=)\s*)$", re.IGNORECASE)

# IBAN: country code, two check digits, 11-30 alphanumerics, optionally grouped by four.
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![\w])", re.ASCII)

# Bank accounts have no universal shape; a digit group is only unambiguous next to a keyword.
_BANK_ACCOUNT = re.compile(
    r"(?:계좌(?:번호)?|account(?: number| no\.?| #)?|acct\.?(?: no\.?)?)\s*[:：]?\s*"
    r"(\d{2,6}-\d{2,6}-\d{2,8}(?:-\d{1,6})?|\d{10,14})(?![\d-])",
    re.IGNORECASE | re.ASCII,
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(m: re.Match) -> bool:
    raw = m.group(0)
    digits = re.sub(r"[ -]", "", raw)
    if not 13 <= len(digits) <= 19:
        return False
    seps = set(re.findall(r"[ -]", raw))
    if len(seps) > 1:  # "1234 5678-9012 3456" mixes separators: not a card as written
        return False
    # Issuer prefixes (Visa 4, Mastercard 51-55/22-27, Amex 34/37, Discover 6, JCB 35,
    # Diners 30/36/38, UnionPay 62): a Luhn-valid digit run without one is a coincidence.
    if not re.match(r"4|5[1-5]|2[2-7]|3[0478]|35|6", digits):
        return False
    return luhn_valid(digits)


def _rrn_ok(m: re.Match) -> bool:
    month, day = int(m.group(2)), int(m.group(3))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return False
    if "-" in m.group(0):
        return True
    # Written solid, thirteen digits are common (timestamps, ids): the check digit must hold too
    # (weights 2..9,2..5 mod 11; numbers issued since October 2020 have none, and need the dash).
    digits = m.group(0)
    total = sum(int(d) * w for d, w in zip(digits, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5), strict=False))
    return (11 - total % 11) % 10 == int(digits[12])


def _ipv4_ok(m: re.Match) -> bool:
    if _VERSION_BEFORE.search(m.string[max(0, m.start() - 10) : m.start()]):
        return False
    try:
        return ipaddress.IPv4Address(m.group(0)).is_global
    except ValueError:
        return False


def _ipv6_ok(m: re.Match) -> bool:
    text = m.group(0)
    # Slices (a[1::2]), C++ scopes (std::vector) and clock times (12:30:45) parse or look
    # like addresses; real ones have at least three colons and a group of two or more hex digits.
    if text.count(":") < 3 or not re.search(r"[0-9A-Fa-f]{2}", text):
        return False
    try:
        return ipaddress.IPv6Address(text).is_global
    except ValueError:
        return False


def _iban_ok(m: re.Match) -> bool:
    compact = m.group(0).replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    as_number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(as_number) % 97 == 1


@dataclass(frozen=True)
class PiiRule:
    kind: str  # the count key in stats.json
    mask: str  # the placeholder written in place of the match
    pattern: re.Pattern
    valid: Callable[[re.Match], bool] | None = None
    group: int = 0  # which group is the personal part (the rest of the match stays)
    needs: tuple[str, ...] = ()  # substrings, one of which any match contains: a fast pre-check


# Order matters: e-mails first (they contain digits and dots), RRNs and cards before phones
# (a card's digit groups could look like a phone), IBANs before bank accounts.
RULES: tuple[PiiRule, ...] = (
    PiiRule("email", "<EMAIL>", _EMAIL, needs=("@",)),
    PiiRule("kr_rrn", "<KR_RRN>", _KR_RRN, _rrn_ok),
    PiiRule("card", "<CARD>", _CARD, _card_ok),
    PiiRule("iban", "<IBAN>", _IBAN, _iban_ok),
    PiiRule("bank_account", "<BANK_ACCOUNT>", _BANK_ACCOUNT, group=1, needs=("계좌", "ccount", "CCOUNT", "cct", "CCT")),
    PiiRule("phone", "<PHONE>", _PHONE),
    PiiRule("ip", "<IP>", _IPV4, _ipv4_ok, needs=(".",)),
    PiiRule("ip", "<IP>", _IPV6, _ipv6_ok, needs=(":",)),
)

# Two digits, a digit and a dot, "@" or ":" must appear for any rule to match: most code lines have none of the
# patterns' anchors, and skipping them is most of the masker's speed.
_ANY_ANCHOR = re.compile(r"[@:]|\d[\d.]")


def mask_pii(text: str) -> tuple[str, Counter]:
    """Return `text` with personal data replaced by placeholders, and a count per kind."""
    counts: Counter = Counter()
    if not _ANY_ANCHOR.search(text):
        return text, counts
    for rule in RULES:
        if rule.needs and not any(n in text for n in rule.needs):
            continue

        def replace(m: re.Match, rule: PiiRule = rule) -> str:
            if rule.valid is not None and not rule.valid(m):
                return m.group(0)
            counts[rule.kind] += 1
            if rule.group == 0:
                return rule.mask
            start, end = m.span(rule.group)
            return m.string[m.start() : start] + rule.mask + m.string[end : m.end()]

        text = rule.pattern.sub(replace, text)
    return text, counts


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, matched text) for each piece of personal data left in `text`; [] when clean."""
    found = []
    for rule in RULES:
        for m in rule.pattern.finditer(text):
            if rule.valid is None or rule.valid(m):
                found.append((rule.kind, m.group(rule.group)))
    return found
