"""How numbers are written in the report, the CLI and the README: rates with their interval and n."""

from __future__ import annotations


def pct(v) -> str:
    """A share as a whole percentage; "-" for None or NaN."""
    return "-" if v is None or v != v else f"{v:.0%}"


def num(v, fmt: str = ".2f") -> str:
    """A number in ``fmt``; "-" for None or NaN."""
    return "-" if v is None or v != v else format(v, fmt)


def fmt_rate(r: dict | None) -> str:
    """``62% [41%, 80%] (n=15)`` from a rate record (``refusal_rate`` or ``rate``, ``ci``, ``n``)."""
    if not r or not r.get("n"):
        return "- (n=0)"
    lo, hi = r["ci"]
    return f"{pct(r.get('refusal_rate', r.get('rate')))} [{pct(lo)}, {pct(hi)}] (n={r['n']})"


def by_method(values: dict | None) -> str:
    """``attribution 20, cosine none up to the largest K`` from ``{method: K or None}``."""
    return ", ".join(f"{k} {'none up to the largest K' if v is None else v}" for k, v in (values or {}).items()) or "-"


def fmt_share(value: float | None, ci: list | tuple | None = None) -> str:
    """A share of a reference's effect with its interval: ``112% [98%, 130%]``; a None bound of ``ci`` is
    written "unbounded" (resamples in which the reference removed nothing)."""
    if value is None or value != value:
        return "- (the reference removed nothing)"
    out = pct(value)
    if ci is not None:
        lo, hi = ci
        out += f" [{'unbounded' if lo is None else pct(lo)}, {'unbounded' if hi is None else pct(hi)}]"
    return out


def share_note(value: float | None) -> str:
    """What a share above 100% means, for the circuit against the direction; "" otherwise."""
    if value is None or value != value or value <= 1:
        return ""
    return " (above 100%: the circuit removes more refusal than the direction does)"
