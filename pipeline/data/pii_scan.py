"""A second PII detector for the clean-corpus check, built differently from the masker.

`pipeline.data.pii` finds personal data with one regular expression per kind; if a pattern has a
blind spot, a check that reuses the same patterns has it too. This scanner walks the text
instead: it cuts out every run of digits joined by single separators (- . space, parentheses,
a leading +), every word around an "@", every colon-joined hex token and every capitalised
letter-digit run, and decides what each one is from its digits: Luhn and an issuer digit for
cards, the date and check digit for resident registration numbers, the number of digits and
the prefix for phones, octet ranges and `ipaddress` for IPs, mod-97 for IBANs. Its boundaries
are "not an ASCII letter or digit", so any script next to a value ends it.
"""

from __future__ import annotations

import ipaddress
import re

_DIGITS = frozenset("0123456789")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_EMAIL_LOCAL = _ALNUM | frozenset(".%+-")
_EMAIL_DOMAIN = _ALNUM - {"_"} | frozenset(".-")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_KR_PREFIXES = ("010", "011", "016", "017", "018", "019", "070", "080", "02") + tuple(
    f"0{a}{b}" for a in "3456" for b in "12345"
)
_NEXT_DIGIT = re.compile(r"[0-9]")  # only to skip ahead; what a run is, is decided below
_VERSION_WORDS = ("version", "ver", "ver.", "==", ">=", "<=", "~=", "python", "release")


# The first digits a card issuer uses (Visa 4, Mastercard 51-55 and 22-27, Amex 34/37, Diners
# 30/36/38, JCB 35, Discover and UnionPay 6): one Luhn-valid run in ten would pass without them,
# and code is full of long constants (the standard library's hash tests hold 18-digit ones).
_ISSUER = re.compile(r"4|5[1-5]|2[2-7]|3[045678]|6")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def rrn_check_digit(digits: str) -> bool:
    """The check digit of a 13-digit resident registration number (issued before October 2020)."""
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    total = sum(int(d) * w for d, w in zip(digits[:12], weights, strict=True))
    return (11 - total % 11) % 10 == int(digits[12])


def iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


def _number_runs(text: str):
    """(start, end, groups, separators) of each run of ASCII digit groups joined by one
    separator each ("-", ".", " ", ") ", ")"), with an optional leading "+" or "("."""
    n, i = len(text), 0
    while i < n:
        found = _NEXT_DIGIT.search(text, i)  # jump ahead: most characters are not near a digit
        if not found:
            return
        i = max(i, found.start() - 1)
        start = i
        if text[i] in "+(" and i + 1 < n and text[i + 1] in _DIGITS:
            i += 1
        if text[i] not in _DIGITS or (start > 0 and (text[start - 1] in _ALNUM or text[start - 1] in ".+-")):
            i = max(i, start) + 1
            continue
        groups, seps = [], []
        while True:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            groups.append(text[i:j])
            sep = ""
            if j < n and text[j] == ")":
                sep = ") " if j + 1 < n and text[j + 1] == " " else ")"
            elif j < n and text[j] in "-. ":
                sep = text[j]
            if sep and j + len(sep) < n and text[j + len(sep)] in _DIGITS:
                seps.append(sep)
                i = j + len(sep)
                continue
            i = j
            break
        after = text[i : i + 2]
        if not (after[:1] and (after[:1] in _ALNUM or after[:1] == "-" or (after[:1] == "." and after[1:] in _DIGITS))):
            yield start, i, groups, seps
        while i < n and (text[i] in _ALNUM or text[i] in ".-"):  # skip the rest of a longer token
            i += 1


def _after_version_word(text: str, start: int) -> bool:
    """1.2.3.4 after "version", "==" and the like is a version, not an address."""
    return text[max(0, start - 12) : start].rstrip().lower().endswith(_VERSION_WORDS)


def _classify(text: str, start: int, groups: list[str], seps: list[str]) -> str | None:
    digits = "".join(groups)
    plus, paren = text[start] == "+", text[start] == "("
    kinds = set(s.strip() or " " for s in seps)
    if len(kinds) > 1 and not (paren or ")" in kinds):
        return None  # mixed separators: not one number as written
    if kinds == {"."} and len(groups) == 4 and all(1 <= len(g) <= 3 for g in groups) and not plus:
        if _after_version_word(text, start) or any(len(g) > 1 and g[0] == "0" for g in groups):
            return None
        try:
            return "ip" if ipaddress.IPv4Address(".".join(groups)).is_global else None
        except ValueError:
            return None
    if plus:
        if digits.startswith("82") and 10 <= len(digits) <= 12:
            return "phone"
        if digits.startswith("1") and len(digits) == 11:
            return "phone"
        return None
    if len(digits) == 13 and (not seps or (seps == ["-"] and len(groups[0]) == 6)):
        month, day, sex = int(digits[2:4]), int(digits[4:6]), digits[6]
        if 1 <= month <= 12 and 1 <= day <= 31 and sex in "12345678" and (seps or rrn_check_digit(digits)):
            return "kr_rrn"
    if 13 <= len(digits) <= 19 and _ISSUER.match(digits) and luhn(digits) and kinds <= {"-", " "}:
        return "card"
    sizes = [len(g) for g in groups]
    if seps and len(groups) == 3 and groups[0] in _KR_PREFIXES and sizes[1] in (3, 4) and sizes[2] == 4:
        return "phone"  # 02-123-4567, 010 1234 5678, (031) 234-5678
    if not seps and digits[:3] in _KR_PREFIXES[:6] and len(digits) in (10, 11):
        return "phone"  # a Korean mobile written solid
    if sizes == [3, 3, 4] and digits[0] in "23456789" and digits[3] in "23456789":
        return "phone"  # 415-555-2671, (415) 555 2671, 415.555.2671
    return None


def _emails(text: str):
    at = text.find("@")
    while at != -1:
        left = at
        while left > 0 and text[left - 1] in _EMAIL_LOCAL:
            left -= 1
        right = at + 1
        while right < len(text) and text[right] in _EMAIL_DOMAIN:
            right += 1
        local, domain = text[left:at], text[at + 1 : right].rstrip(".-")
        labels = domain.split(".")
        if local and len(labels) >= 2 and all(labels) and labels[-1].isalpha() and len(labels[-1]) >= 2:
            yield "email", f"{local}@{domain}"
        at = text.find("@", at + 1)


def _ipv6(text: str):
    """Each maximal run of hex digits and colons around a "::" or with three or more colons."""
    n, colon = len(text), text.find(":")
    while colon != -1:
        i = colon
        while i > 0 and text[i - 1] in _HEX_COLON:
            i -= 1
        j = colon
        while j < n and text[j] in _HEX_COLON:
            j += 1
        colon = text.find(":", j)
        if i > 0 and text[i - 1] in _ALNUM:
            continue
        token = text[i:j]
        if token.count(":") >= 3 and (j >= n or text[j] not in _ALNUM):
            try:
                if ipaddress.IPv6Address(token).is_global and any(len(g) >= 2 for g in token.split(":")):
                    yield "ip", token
            except ValueError:
                pass


def _ibans(text: str):
    words = text.split(" ")
    for w in range(len(words)):
        first = words[w]
        if len(first) < 4 or not (first[:2].isupper() and first[:2].isascii() and first[2:4].isdigit()):
            continue
        compact, used = "", []
        for word in words[w : w + 9]:
            head = word
            for k, ch in enumerate(word):  # a particle or punctuation right after the last group ends it
                if ch not in _ALNUM:
                    head = word[:k]
                    break
            if not head or head.upper() != head or len(compact + head) > 34:
                break
            compact += head
            used.append(head)
            if iban_valid(compact):
                yield "iban", " ".join(used)
                break
            if head != word:
                break


def _bank_accounts(text: str):
    """A run of 10-14 digits (dashes allowed) within a few characters after an account keyword."""
    lower = text.lower()
    for key in ("계좌", "account", "acct"):
        at = lower.find(key)
        while at != -1:
            i = at + len(key)
            limit = i + 12
            while i < min(limit, len(text)) and text[i] not in _DIGITS:
                i += 1
            j = i
            while j < len(text) and (text[j] in _DIGITS or (text[j] == "-" and text[j + 1 : j + 2] in _DIGITS)):
                j += 1
            if 10 <= sum(c in _DIGITS for c in text[i:j]) <= 14 and text[j : j + 1] not in _ALNUM:
                yield "bank_account", text[i:j]
            at = lower.find(key, at + 1)


def scan_pii(text: str) -> list[tuple[str, str]]:
    """(kind, text) for each piece of personal data the scanner sees; [] when clean."""
    found = [*_emails(text), *_ipv6(text), *_ibans(text), *_bank_accounts(text)]
    for start, end, groups, seps in _number_runs(text):
        kind = _classify(text, start, groups, seps)
        if kind:
            # "(" belongs to the number only as an area code's bracket, as in (02) 555-1234; in
            # "(02-788-1234, ...)" or "(780512-1234568)를" it opens a remark around it.
            opens_remark = text[start] == "(" and not (seps and seps[0].startswith(")"))
            found.append((kind, text[start + opens_remark : end]))
    return found


def pii_left(text: str) -> list[tuple[str, str, str]]:
    """(detector, kind, text) for personal data that either the masker's own patterns or this
    scanner still find in `text`: what the clean-corpus check reports."""
    from pipeline.data.pii import find_pii

    return [("patterns", *f) for f in find_pii(text)] + [("scanner", *f) for f in scan_pii(text)]
