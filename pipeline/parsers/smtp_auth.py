"""Mail-server authentication logs (Postfix, Dovecot, Exim, Courier, Cyrus, Sendmail) into events."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import polars as pl

from pipeline.parsers import register
from pipeline.parsers.base import ParseContext, ParsedBatch, Parser, conform, empty_events
from pipeline.parsers.syslog import MAX_LINE_CHARS, Clock, line_series, split_lines
from pipeline.schema import Flag, Outcome, Service

NOT_AUTH = "not an authentication event"

# Every pattern is matched against the text after the timestamp and anchored at its start: an
# optional host token, then the daemon's own tag. Anchoring matters because user names, HELO
# strings and reverse-DNS names inside a line are chosen by the client, and an unanchored
# search would let a client write a fake "auth failed for <someone else's IP>" into the log.
_HOST = r"^(?:[^\s\[\]]*[^\s:\[\]] )?"
_TAG = r"(?P<tag>[^\s\[\]():]+)(?:\[[0-9]*\])?"
_IP = r"(?P<ip>[^\]\s]*)"
# Dovecot often logs through a `dovecot:` or `dovecot[pid]:` tag before its own process tag.
_DOVECOT = r"(?:[A-Za-z0-9_-]*dovecot[A-Za-z0-9_-]*(?:\[[0-9]*\])?: )*"
# Exim lines may sit behind a syslog tag and repeat their own timestamp and pid.
_EXIM = (
    r"(?:exim[^\s\[\]:]*(?:\[[0-9]*\])?: )?(?:[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]+)?(?: [+-][0-9]{4})? )?(?:\[[0-9]+\] )?"
)

# Postfix smtpd: `warning: host[ip](:port): SASL LOGIN authentication failed: <reason>`.
POSTFIX_FAIL = (
    rf"(?s){_HOST}(?P<tag>[^\s\[\]():]*smtpd)(?:\[[0-9]*\])?: warning: [^\s\[\]]*\[{_IP}\](?::[0-9]+)?: "
    r"SASL (?P<mech>[A-Za-z0-9_-]+) authentication failed:(?P<reason>.*)$"
)
# Postfix smtpd success: `QUEUEID: client=host[ip], sasl_method=PLAIN, sasl_username=alice`.
POSTFIX_OK = (
    rf"(?s){_HOST}(?P<tag>[^\s\[\]():]*smtpd)(?:\[[0-9]*\])?: (?:[0-9A-Za-z]+: )?client=[^\s\[\]]*\[{_IP}\]"
    r"(?::[0-9]+)?, sasl_method=(?P<mech>[^,\s]+), sasl_username=(?P<user>.*?)(?:, sasl_sender=.*)?$"
)
POSTFIX_LOST = (
    rf"(?s){_HOST}(?P<tag>[^\s\[\]():]*smtpd)(?:\[[0-9]*\])?: (?:NOQUEUE: )?lost connection after AUTH "
    rf"from [^\s\[\]]*\[{_IP}\](?::[0-9]+)?$"
)
# Dovecot login processes: `imap-login: Disconnected (auth failed, 1 attempts): user=<u>, ...`.
DOVECOT_LOGIN = (
    rf"(?s){_HOST}{_DOVECOT}(?P<tag>[a-z0-9]+)-login(?:\[[0-9]*\])?: (?:Info: )?(?P<text>.*)$"
)
# The reason in parentheses must come before the first `<`, i.e. before the client-chosen
# `user=<...>` field, so a user name cannot fake it.
DOVECOT_LOGIN_FAIL = (
    r"(?s)^[^<]*\((?:auth failed, [0-9]+ attempts?[^)]*|tried to use (?:disabled|disallowed) [^()]* auth"
    r"|proxy dest auth failed)\)"
)
# Dovecot auth process, up to 2.3: `auth-worker(123): pam(user,1.2.3.4,<session>): Password mismatch`.
DOVECOT_AUTH = (
    rf"(?s){_HOST}{_DOVECOT}auth(?:-worker)?(?:\([^)]*\))?: (?:Info: )?(?:conn .*?: auth-worker<[0-9]+>: )?"
    r"(?P<db>[a-z0-9_-]+)\((?P<user>.*),(?P<ip>[0-9A-Fa-f:.]+)(?:,[^()]*)?\): (?P<msg>.*)$"
)
# Dovecot 2.4: `auth(user,1.2.3.4,sasl:login)<session>: Info: sql: Password mismatch (given password: ...)`.
DOVECOT_AUTH_24 = (
    rf"(?s){_HOST}{_DOVECOT}auth(?:-worker)?\((?P<user>.*),(?P<ip>[0-9A-Fa-f:.]+)(?:,(?P<extra>[^()]*))?\)"
    r"(?:<[^>]*>)*: (?:request \[[0-9]+\]: )?(?:Info: )?(?P<db>[a-z0-9_-]+): (?P<msg>.*)$"
)
DOVECOT_FAILURE_WORDS = (
    r"(?i)unknown user|password mismatch|pam_authenticate\(\) failed|invalid credentials"
    r"|authentication fail|user not known|user not found"
)
# Exim: `login authenticator failed for host (helo) [ip]:port I=[local]:587: 535 ... (set_id=user)`.
EXIM_FAIL = (
    rf"(?s){_HOST}{_EXIM}(?P<auth>[A-Za-z0-9_-]+) authenticator failed for (?:[^\s\[(]+ )?(?:\(.*?\) )?"
    rf"\[{_IP}\](?::[0-9]+)?(?: I=\[[^\]]*\](?::(?P<lport>[0-9]+))?)?(?: Ci=[0-9]+)?: "
    r"(?P<status>[0-9]{3})(?P<text>.*)$"
)
# Courier: `imapd-ssl: LOGIN FAILED, user=u, ip=[::ffff:1.2.3.4]`; success is `LOGIN, user=...`.
COURIER = rf"(?s){_HOST}{_TAG}: (?P<kind>LOGIN FAILED|LOGIN), (?P<fields>.*)$"
# Cyrus: `badlogin: host [ip] plaintext user SASL(-13): ...` or `... MECH [SASL(-13): ...]`.
CYRUS_FAIL = (
    rf"(?s){_HOST}{_TAG}: badlogin: (?:[^\s\[\]]+ ?)?\[{_IP}\] (?P<mech>\S+) (?:(?P<user>[^\[]*?) )?"
    r"\[?SASL\((?P<code>-?[0-9]+)\)"
)
# Sendmail: `QUEUEID: AUTH failure (LOGIN): authentication failure ..., user=u, relay=host [ip]`.
SENDMAIL_FAIL = rf"(?s){_HOST}{_TAG}: (?:[0-9A-Za-z]+: )?AUTH failure \((?P<mech>[^)]*)\): (?P<text>.*)$"

# Literal or cheap tests that say which of the patterns above may match a line.
_ROUTES: list[tuple[str, pl.Expr]] = [
    ("postfix_fail", pl.col("rest").str.contains(" authentication failed:", literal=True)),
    ("postfix_ok", pl.col("rest").str.contains("sasl_username=", literal=True)),
    ("postfix_lost", pl.col("rest").str.contains("lost connection after AUTH", literal=True)),
    ("exim", pl.col("rest").str.contains(" authenticator failed for ", literal=True)),
    ("courier", pl.col("rest").str.contains(r": LOGIN(?: FAILED)?, ")),
    ("cyrus", pl.col("rest").str.contains(": badlogin: ", literal=True)),
    ("sendmail", pl.col("rest").str.contains("AUTH failure (", literal=True)),
    ("dovecot_login", pl.col("rest").str.contains("-login", literal=True)),
    ("dovecot_auth", pl.col("rest").str.contains(r"auth(?:-worker)?[(:]")),
]
FALLBACK_MAX_CHARS = 2048
# Shapes only the per-line fallback knows (rare, or needing logic beyond one regex).
_FALLBACK_HINT = (
    r"(?i)pam_unix\(|possible SMTP attack: command=AUTH|AUTH=server, |\sA=[A-Za-z0-9_-]+:"
    r"|: login: |protocol error in \"auth"
)

# Routes whose keyword only occurs in authentication lines: a line routed there that no pattern
# takes is a format variant worth a distinct quarantine reason. The other keywords ("-login",
# "auth(", "LOGIN, ") also occur in ordinary lines, which are simply "not an authentication event".
_VENDOR = {
    "postfix_fail": "Postfix SASL failure",
    "postfix_ok": "Postfix SASL login",
    "postfix_lost": "Postfix lost-connection",
    "exim": "Exim authenticator",
    "cyrus": "Cyrus badlogin",
    "sendmail": "Sendmail AUTH failure",
}
_SPECIFIC_ROUTES = tuple(_VENDOR)

# Columns every shape produces before the common finishing step.
_SHAPE_SCHEMA: dict[str, pl.DataType] = {
    "row": pl.Int64,
    "svc": pl.String,  # text that names the protocol (tag, PAM service, dovecot login name)
    "secure": pl.Boolean,  # implicit TLS known (smtps, imaps, port 465)
    "ip_raw": pl.String,
    "account": pl.String,
    "method": pl.String,
    "status": pl.Int64,
    "outcome": pl.String,
    "flags": pl.String,
    "reject": pl.String,  # set when the line matched a shape but is not an authentication event
}

_MAIL_TOKENS = (
    r"(?i)postfix|dovecot|-login|imapd|pop3d|exim|courier|cyrus|sendmail|sm-mta|smtpd|authenticator"
    r"|sasl|badlogin|LOGIN FAILED|\bimap|\bpop3|\bsmtp|\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}\b"
)


@register
class SmtpAuthParser(Parser):
    """SMTP/IMAP/POP3 authentication results from syslog-style mail logs.

    Failures become `auth_failed`, successful logins `ok`; the auth server being unreachable is
    `server_error` and a client offering an unusable mechanism or hanging up inside AUTH is
    `client_error`. Other mail-log lines (rejects, connects, queue activity) are rejected as
    "not an authentication event", which is expected for most of a busy mail log.
    """

    name = "smtp-auth"

    def __init__(self, ctx: ParseContext):
        super().__init__(ctx)
        self.clock = Clock.from_context(ctx.timezone, ctx.reference_time)

    @classmethod
    def sniff(cls, lines: Sequence[str]) -> float:
        sample = [line for line in lines if isinstance(line, str) and line.strip()]
        if not sample:
            return 0.0
        series, _ = line_series([line[:MAX_LINE_CHARS] for line in sample])
        clock = Clock(tz="UTC", reference_year=2000, reference_month=12)
        split = split_lines(series, clock, header=False)
        # A timestamp parse may fail on a calendar detail (Feb 29 in a guessed year): for sniffing
        # the shape is what counts, so a recognised-but-invalid timestamp still counts.
        looks = (
            (pl.col("ts").is_not_null() | (pl.col("ts_error") != "no recognised timestamp"))
            & pl.col("rest").str.contains(_MAIL_TOKENS)
        )
        return float(split.select(looks.fill_null(False).mean()).item() or 0.0)

    def parse(self, lines: Sequence[str]) -> ParsedBatch:
        if len(lines) == 0:
            return ParsedBatch.empty()
        series, rejected = line_series(lines)
        frame = pl.DataFrame({"row": pl.int_range(0, len(series), eager=True, dtype=pl.Int64), "line": series})
        too_long = frame.filter(pl.col("line").str.len_chars() > MAX_LINE_CHARS)
        rejected += [(row, f"line longer than {MAX_LINE_CHARS} characters") for row in too_long["row"]]
        already = {row for row, _ in rejected}
        nulls = frame.filter(pl.col("line").is_null())["row"].to_list()
        rejected += [(row, "line is not text") for row in nulls if row not in already]
        frame = frame.filter(pl.col("line").is_not_null() & (pl.col("line").str.len_chars() <= MAX_LINE_CHARS))

        split = split_lines(frame["line"], self.clock, header=False).with_columns(frame["row"])
        bad_time = split.filter(pl.col("ts").is_null())
        rejected += list(bad_time.select("row", "ts_error").iter_rows())
        timed = split.filter(pl.col("ts").is_not_null()).select("row", "ts", "rest")

        # `route` is the first shape whose keyword the line contains; it only names the reject
        # reason. Every shape whose keyword appears gets its try, in order, so text a client put
        # in a HELO or user name cannot steer a real failure away from the pattern that fits it.
        route = pl.lit(None, dtype=pl.String)
        for name, test in reversed(_ROUTES):
            route = pl.when(test).then(pl.lit(name)).otherwise(route)
        pool = timed.select("row", "rest", route.alias("route"), *[test.alias(f"k_{n}") for n, test in _ROUTES])

        shaped: list[pl.DataFrame] = []
        for name, build in _SHAPES.items():
            part = pool.filter(pl.col(f"k_{name}"))
            if part.height == 0:
                continue
            matched = build(part.select("row", "rest"))
            shaped.append(matched)
            pool = pool.join(matched.select("row"), on="row", how="anti")
        leftovers = pool.select("row", "rest", "route")

        # Per-line fallback only for rows that carry a hint of a rarer shape; the rest of a mail
        # log (queue activity, rejects, connects) is rejected without a Python loop. Python's
        # backtracking regexes can go quadratic on crafted text, so the fallback only sees lines
        # of plausible length (the longest real auth line in fail2ban's samples is ~400 chars).
        slow_path = pl.col("rest").str.contains(_FALLBACK_HINT) & (pl.col("rest").str.len_chars() <= FALLBACK_MAX_CHARS)
        hinted = leftovers.filter(slow_path)
        plain = leftovers.filter(~slow_path)
        rejected += list(plain.select("row", _reason_for_unmatched()).iter_rows())
        slow, slow_rejects = _fallback(hinted)
        rejected += slow_rejects
        shaped.append(slow)

        events = pl.concat([_conform_shape(s) for s in shaped])
        events, ip_rejects = _finish(events, timed.select("row", "ts"))
        rejected += ip_rejects
        rejected.sort()
        return ParsedBatch(events=events, rejected=rejected)


def _reason_for_unmatched() -> pl.Expr:
    reason = pl.lit(NOT_AUTH)
    for name in _SPECIFIC_ROUTES:
        reason = pl.when(pl.col("route") == name).then(pl.lit(f"unrecognised {_VENDOR[name]} line")).otherwise(reason)
    return reason.alias("reason")


def _scalar_reason_for_unmatched(route: str | None) -> str:
    return f"unrecognised {_VENDOR[route]} line" if route in _SPECIFIC_ROUTES else NOT_AUTH


# --------------------------------------------------------------------------- vectorised shapes


def _matching(part: pl.DataFrame, pattern: str) -> pl.DataFrame:
    """Rows that `pattern` matches, with its groups as columns."""
    extracted = part.with_columns(pl.col("rest").str.extract_groups(pattern).alias("g")).unnest("g")
    # Every pattern has a mandatory `ip` or `tag` group: it is null exactly when nothing matched.
    key = "ip" if "(?P<ip>" in pattern else "tag"
    return extracted.filter(pl.col(key).is_not_null())


def _upper_token(expr: pl.Expr) -> pl.Expr:
    """A mechanism name as logged, upper-cased; null if it is not a plausible token."""
    token = expr.str.strip_chars().str.to_uppercase()
    return pl.when(token.str.contains(r"^[A-Z0-9_+-]{1,40}$")).then(token).otherwise(pl.lit(None, dtype=pl.String))


def _postfix_fail(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, POSTFIX_FAIL)
    reason = pl.col("reason")
    outcome = (
        pl.when(reason.str.contains("Connection lost to authentication server", literal=True))
        .then(pl.lit(Outcome.SERVER_ERROR.value))
        .when(reason.str.contains("Invalid authentication mechanism", literal=True))
        .then(pl.lit(Outcome.CLIENT_ERROR.value))
        .otherwise(pl.lit(Outcome.AUTH_FAILED.value))
    )
    return m.select(
        "row",
        pl.lit("smtp").alias("svc"),
        pl.col("tag").str.contains("/smtps/", literal=True).alias("secure"),
        pl.col("ip").alias("ip_raw"),
        reason.str.extract(r"(?s)\bsasl_username=(.*)$", 1).alias("account"),
        _upper_token(pl.col("mech")).alias("method"),
        outcome.alias("outcome"),
    )


def _postfix_ok(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, POSTFIX_OK)
    return m.select(
        "row",
        pl.lit("smtp").alias("svc"),
        pl.col("tag").str.contains("/smtps/", literal=True).alias("secure"),
        pl.col("ip").alias("ip_raw"),
        pl.col("user").alias("account"),
        _upper_token(pl.col("mech")).alias("method"),
        pl.lit(Outcome.OK.value).alias("outcome"),
    )


def _postfix_lost(part: pl.DataFrame) -> pl.DataFrame:
    # The client hung up inside the AUTH exchange. When a password was actually rejected Postfix
    # has already logged "SASL ... authentication failed" for it; counting this line as a failure
    # too would double every brute-force attempt that disconnects (fail2ban's gh-3505 reasoning).
    m = _matching(part, POSTFIX_LOST)
    return m.select(
        "row",
        pl.lit("smtp").alias("svc"),
        pl.col("tag").str.contains("/smtps/", literal=True).alias("secure"),
        pl.col("ip").alias("ip_raw"),
        pl.lit(Outcome.CLIENT_ERROR.value).alias("outcome"),
    )


def _exim(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, EXIM_FAIL)
    status = pl.col("status").cast(pl.Int64, strict=False)
    return m.select(
        "row",
        pl.lit("smtp").alias("svc"),
        (pl.col("lport") == "465").fill_null(False).alias("secure"),
        pl.col("ip").alias("ip_raw"),
        pl.col("text").str.extract(r"(?s)\(set_id=(.*)\)\s*$", 1).alias("account"),
        _method_from_authenticator(pl.col("auth")).alias("method"),
        status.alias("status"),
        # 4xx is Exim's "temporary failure" (435/454: the password backend is down).
        pl.when(status.is_between(400, 499))
        .then(pl.lit(Outcome.SERVER_ERROR.value))
        .otherwise(pl.lit(Outcome.AUTH_FAILED.value))
        .alias("outcome"),
    )


def _method_from_authenticator(name: pl.Expr) -> pl.Expr:
    """Exim authenticators are named in the config; the usual names say their mechanism."""
    lowered = name.str.to_lowercase()
    return (
        pl.when(lowered.str.contains("cram")).then(pl.lit("CRAM-MD5"))
        .when(lowered.str.contains("plain")).then(pl.lit("PLAIN"))
        .when(lowered.str.contains("login")).then(pl.lit("LOGIN"))
        .when(lowered.str.contains("xoauth")).then(pl.lit("XOAUTH2"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _courier(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, COURIER)
    fields = pl.col("fields")
    # The last `ip=[...]` is Courier's own; an earlier one could only come from the user name.
    ip = fields.str.extract(r"(?s)^.*\bip=\[([^\]]*)\]", 1)
    matched = m.with_columns(ip.alias("ip")).filter(pl.col("ip").is_not_null())
    failed = pl.col("kind") == "LOGIN FAILED"
    return matched.select(
        "row",
        pl.col("tag").alias("svc"),
        pl.col("tag").str.to_lowercase().str.contains("ssl").alias("secure"),
        pl.col("ip").alias("ip_raw"),
        fields.str.extract(r"(?s)^user=(.*?), (?:method=|ip=\[)", 1).alias("account"),
        _upper_token(fields.str.extract(r"(?:^|, )method=([^,]*)", 1)).alias("method"),
        pl.when(failed).then(pl.lit(Outcome.AUTH_FAILED.value)).otherwise(pl.lit(Outcome.OK.value)).alias("outcome"),
    )


def _cyrus(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, CYRUS_FAIL)
    return m.select(
        "row",
        pl.col("tag").alias("svc"),
        pl.col("tag").str.contains(r"(?i)imaps|pop3s").alias("secure"),
        pl.col("ip").alias("ip_raw"),
        pl.col("user").alias("account"),
        _upper_token(pl.col("mech")).alias("method"),
        # SASL(-4) is SASL_NOMECH: the client asked for a mechanism the server does not offer.
        pl.when(pl.col("code") == "-4")
        .then(pl.lit(Outcome.CLIENT_ERROR.value))
        .otherwise(pl.lit(Outcome.AUTH_FAILED.value))
        .alias("outcome"),
    )


def _sendmail(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, SENDMAIL_FAIL)
    text = pl.col("text")
    # The last `relay=` is sendmail's own; earlier ones can only come from the user name.
    ip = text.str.extract(r"(?s)^.*\brelay=(?:[^\s\[\]]+ )?\[([^\]\s]*)\]", 1)
    matched = m.with_columns(ip.alias("ip")).filter(pl.col("ip").is_not_null())
    return matched.select(
        "row",
        pl.lit("smtp").alias("svc"),
        pl.lit(False).alias("secure"),
        pl.col("ip").alias("ip_raw"),
        text.str.extract(r"(?s), user=(.*?), relay=", 1).alias("account"),
        _upper_token(pl.col("mech")).alias("method"),
        pl.lit(Outcome.AUTH_FAILED.value).alias("outcome"),
    )


def _dovecot_login(part: pl.DataFrame) -> pl.DataFrame:
    m = _matching(part, DOVECOT_LOGIN)
    text = pl.col("text")
    failed = text.str.contains(DOVECOT_LOGIN_FAIL)
    succeeded = text.str.starts_with("Login: ")
    # Dovecot writes rip= after the client-chosen user=<...>, so the last rip= is the real one.
    ip = text.str.extract(r"(?s)^.*\brip=([0-9A-Fa-f:.]+)", 1)
    return m.select(
        "row",
        pl.col("tag").alias("svc"),
        pl.lit(False).alias("secure"),
        ip.alias("ip_raw"),
        text.str.extract(r"\buser=<([^>]*)>", 1).alias("account"),
        _upper_token(text.str.extract(r"\bmethod=([A-Za-z0-9_-]+)", 1)).alias("method"),
        pl.when(failed).then(pl.lit(Outcome.AUTH_FAILED.value))
        .when(succeeded).then(pl.lit(Outcome.OK.value))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("outcome"),
        pl.when(failed | succeeded).then(pl.lit(None, dtype=pl.String)).otherwise(pl.lit(NOT_AUTH)).alias("reject"),
    )


def _dovecot_auth(part: pl.DataFrame) -> pl.DataFrame:
    new = _matching(part, DOVECOT_AUTH_24)
    old = _matching(part.join(new.select("row"), on="row", how="anti"), DOVECOT_AUTH)
    frames = []
    for m, has_extra in ((new, True), (old, False)):
        msg = pl.col("msg")
        failed = msg.str.contains(DOVECOT_FAILURE_WORDS)
        # 2.4's third field is `sasl:<mechanism>`.
        method = (
            _upper_token(pl.col("extra").str.extract(r"^sasl:([A-Za-z0-9_-]+)", 1))
            if has_extra
            else pl.lit(None, dtype=pl.String)
        )
        frames.append(
            m.select(
                "row",
                pl.lit(None, dtype=pl.String).alias("svc"),
                pl.lit(False).alias("secure"),
                pl.col("ip").alias("ip_raw"),
                pl.col("user").alias("account"),
                method.alias("method"),
                pl.when(failed)
                .then(pl.lit(Outcome.AUTH_FAILED.value))
                .otherwise(pl.lit(None, dtype=pl.String))
                .alias("outcome"),
                # auth_verbose_passwords=plain puts the tried password in the line. It never
                # reaches the event (no free text is kept); the flag makes the leak a finding.
                pl.when(_password_logged(msg)).then(pl.lit(Flag.PASSWORD_LOGGED.value)).alias("flags"),
                pl.when(failed).then(pl.lit(None, dtype=pl.String)).otherwise(pl.lit(NOT_AUTH)).alias("reject"),
            )
        )
    return pl.concat([_conform_shape(f) for f in frames])


def _password_logged(msg: pl.Expr) -> pl.Expr:
    # `(given password: x)` is the plain form; `(SHA1 of given password: f638ff)` is a truncated
    # hash the admin chose instead, and does not count as the password itself.
    return msg.str.contains(r"\(given password: |(?:^|[\s,(])(?:given_)?password=")


_SHAPES: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {
    "postfix_fail": _postfix_fail,
    "postfix_ok": _postfix_ok,
    "postfix_lost": _postfix_lost,
    "exim": _exim,
    "courier": _courier,
    "cyrus": _cyrus,
    "sendmail": _sendmail,
    "dovecot_login": _dovecot_login,
    "dovecot_auth": _dovecot_auth,
}


def _conform_shape(frame: pl.DataFrame) -> pl.DataFrame:
    exprs = []
    for name, dtype in _SHAPE_SCHEMA.items():
        if name in frame.columns:
            exprs.append(pl.col(name).cast(dtype, strict=False))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(exprs)


# --------------------------------------------------------------------------- per-line fallback


@dataclass
class _Hit:
    svc: str | None
    ip_raw: str | None
    outcome: str
    account: str | None = None
    method: str | None = None
    secure: bool = False
    flags: str | None = None


_PAM_UNIX = re.compile(r"\bpam_unix\((?P<svc>[^:()\s]+):auth\): authentication failure;(?P<kv>.*)$", re.S)
# PAM services that authenticate mail users; sshd, sudo, login... are not ours.
_MAIL_PAM_SERVICES = re.compile(
    r"^(?:dovecot|imap|imaps|imapd|pop|pop3|pop3d|pop3s|smtp|smtpd|smtps|submission|sasl|saslauthd|courier"
    r"|cyrus|sendmail|exim|postfix|sieve|managesieve|perdition|mail)$",
    re.I,
)
_SENDMAIL_ATTACK = re.compile(
    _HOST + r"[^\s\[\]():]+(?:\[[0-9]*\])?: (?:[0-9A-Za-z]+: )?(?:[^\s\[\]]+ )?\[(?P<ip>[^\]\s]*)\]"
    r"(?: \(may be forged\))?: possible SMTP attack: command=AUTH, count=[0-9]+",
    re.S,
)
_SENDMAIL_OK = re.compile(
    _HOST + r"[^\s\[\]():]+(?:\[[0-9]*\])?: (?:[0-9A-Za-z]+: )?AUTH=server, relay=(?:[^\s\[\]]+ )?"
    r"\[(?P<ip>[^\]\s]*)\](?: \(may be forged\))?, authid=(?P<user>.*?), mech=(?P<mech>[^,\s]+), bits=",
    re.S,
)
# Exim message arrival after SMTP AUTH: `ID <= sender H=host (helo) [ip]:port I=... P=esmtpsa
# A=dovecot_plain:alice S=...`. Matched in two anchored steps to keep Python's regex linear.
_EXIM_OK = re.compile(
    _HOST + _EXIM + r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4} <= \S* (?:R=\S+ )?"
    r"H=(?:[^\s\[(]+ )?(?:\([^)]*\) )?\[(?P<ip>[^\]\s]*)\](?::[0-9]+)?(?: I=\[[^\]\s]*\](?::(?P<lport>[0-9]+))?)?",
    re.S,
)
_EXIM_OK_AUTH = re.compile(r"\sA=(?P<auth>[A-Za-z0-9_-]+):(?P<user>\S+)")
# Exim refuses AUTH it did not advertise (plain-text port, no TLS): a login attempt it would not
# even check, like Dovecot's "tried to use disabled plaintext auth". The tail after the address
# is Exim's own text; the quoted command before it is the client's.
_EXIM_AUTH_ERROR = re.compile(
    _HOST + _EXIM + r"SMTP protocol error in \"(?P<cmd>.*)\" H=.*\s\[(?P<ip>[^\]\s]*)\](?::[0-9]+)?"
    r"(?: I=\[[^\]]*\](?::(?P<lport>[0-9]+))?)?(?: Ci=[0-9]+)? "
    r"(?P<what>AUTH command used when not advertised|\S+ authentication mechanism not supported)$",
    re.S,
)
_CYRUS_OK = re.compile(
    _HOST + r"(?P<tag>[^\s\[\]():]+)(?:\[[0-9]*\])?: login: (?:[^\s\[\]]+ ?)?\[(?P<ip>[^\]\s]*)\] "
    r"(?P<user>\S+) (?P<mech>\S+)(?: \S+)*? User logged in",
    re.S,
)


def _fallback_line(rest: str) -> _Hit | str:
    """One line the vectorised shapes did not take: a hit, or the reason it is rejected."""
    if m := _PAM_UNIX.search(rest):
        if "=" in rest[: m.start()]:
            return NOT_AUTH  # the pam_unix text sits inside someone's field, not in the header
        if not _MAIL_PAM_SERVICES.match(m["svc"]):
            return "not a mail authentication event"
        kv = m["kv"]
        rhosts = re.findall(r"(?:^|\s)rhost=(\S*)", kv)
        users = re.findall(r"(?:^|\s)user=(\S+)", kv)
        rusers = re.findall(r"(?:^|\s)ruser=([^\s=]+)(?=\s|$)", kv)
        rhost = rhosts[-1] if rhosts else None
        # rhost may be a host name (PAM leaves resolving to the caller); we never do DNS.
        ip_raw = rhost if rhost and _parse_ip(rhost) is not None else None
        account = users[-1] if users else (rusers[-1] if rusers else None)
        return _Hit(svc=m["svc"], ip_raw=ip_raw, outcome=Outcome.AUTH_FAILED.value, account=account)
    if m := _SENDMAIL_ATTACK.match(rest):
        # Sendmail logs this once a session has sent too many AUTH commands. A client that had
        # succeeded would get "503 Already authenticated", so repeated AUTH means failed logins;
        # with default log levels this is sendmail's only trace of SMTP AUTH guessing.
        return _Hit(svc="smtp", ip_raw=m["ip"], outcome=Outcome.AUTH_FAILED.value)
    if m := _SENDMAIL_OK.match(rest):
        return _Hit(svc="smtp", ip_raw=m["ip"], outcome=Outcome.OK.value, account=m["user"], method=m["mech"])
    if m := _EXIM_AUTH_ERROR.match(rest):
        return _exim_auth_error(m)
    if (m := _EXIM_OK.match(rest)) and (a := _EXIM_OK_AUTH.search(rest, m.end())):
        return _Hit(
            svc="smtp",
            ip_raw=m["ip"],
            outcome=Outcome.OK.value,
            account=a["user"],
            method=_scalar_method_from_authenticator(a["auth"]),
            secure=m["lport"] == "465",
        )
    if m := _CYRUS_OK.match(rest):
        return _Hit(
            svc=m["tag"],
            ip_raw=m["ip"],
            outcome=Outcome.OK.value,
            account=m["user"],
            method=m["mech"].split("+", 1)[0],
            secure=bool(re.search(r"(?i)imaps|pop3s", m["tag"])),
        )
    return NOT_AUTH


def _exim_auth_error(m: re.Match[str]) -> _Hit:
    words = m["cmd"].split()
    mech = words[1] if len(words) > 1 else None
    if m["what"] != "AUTH command used when not advertised":
        return _Hit(svc="smtp", ip_raw=m["ip"], outcome=Outcome.CLIENT_ERROR.value, method=mech)
    account, flags = None, None
    if mech and len(words) > 2:
        account, has_password = _initial_response(mech.upper(), words[2])
        flags = Flag.PASSWORD_LOGGED.value if has_password else None
    return _Hit(
        svc="smtp",
        ip_raw=m["ip"],
        outcome=Outcome.AUTH_FAILED.value,
        account=account,
        method=mech,
        secure=m["lport"] == "465",
        flags=flags,
    )


def _initial_response(mech: str, encoded: str) -> tuple[str | None, bool]:
    """(user name, whether a password was logged) from a logged SASL initial response."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None, False
    if mech == "LOGIN":
        return raw.decode("utf-8", "backslashreplace") or None, False
    if mech == "PLAIN":
        # authzid NUL authcid NUL password: keep the authcid, never the password.
        parts = raw.split(b"\0")
        if len(parts) == 3:
            return parts[1].decode("utf-8", "backslashreplace") or None, bool(parts[2])
    return None, False


def _scalar_method_from_authenticator(name: str) -> str | None:
    frame = pl.DataFrame({"a": [name]}, schema={"a": pl.String})
    return frame.select(_method_from_authenticator(pl.col("a")).alias("m"))["m"][0]


def _fallback(hinted: pl.DataFrame) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
    hits: list[dict[str, object]] = []
    rejected: list[tuple[int, str]] = []
    for row, rest, route in hinted.select("row", "rest", "route").iter_rows():
        result = _fallback_line(rest)
        if isinstance(result, str):
            rejected.append((row, _scalar_reason_for_unmatched(route) if result == NOT_AUTH else result))
            continue
        hits.append(
            {
                "row": row,
                "svc": result.svc,
                "secure": result.secure,
                "ip_raw": result.ip_raw,
                "account": result.account,
                "method": result.method,
                "outcome": result.outcome,
                "flags": result.flags,
            }
        )
    columns = ("row", "svc", "secure", "ip_raw", "account", "method", "outcome", "flags")
    frame = pl.DataFrame(hits, schema={k: _SHAPE_SCHEMA[k] for k in columns})
    frame = _conform_shape(frame).with_columns(_upper_token(pl.col("method")).alias("method"))
    return frame, rejected


# --------------------------------------------------------------------------- finishing


def _service(svc: pl.Expr) -> pl.Expr:
    """Protocol from the text that names it: a syslog tag, PAM service or Dovecot login name."""
    lowered = svc.str.to_lowercase()
    return (
        pl.when(lowered.str.contains("imap")).then(pl.lit(Service.IMAP.value))
        .when(lowered.str.contains("pop")).then(pl.lit(Service.POP3.value))
        .when(lowered.str.contains(r"smtp|submission|sendmail|sm-mta|exim|postfix|mta"))
        .then(pl.lit(Service.SMTP.value))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _parse_ip(text: str) -> str | None:
    """Normalised address (IPv4-mapped IPv6 unwrapped, IPv6 compressed) or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _normalise_ips(raw: pl.Series) -> pl.Series:
    """Per distinct address, not per row; "" marks a present but unreadable address."""
    uniques = raw.drop_nulls().unique().to_list()
    mapping = {value: (_parse_ip(value) or "") for value in uniques}
    return raw.replace_strict(mapping, default=None, return_dtype=pl.String)


def _finish(shaped: pl.DataFrame, times: pl.DataFrame) -> tuple[pl.DataFrame, list[tuple[int, str]]]:
    not_auth = shaped.filter(pl.col("reject").is_not_null() | pl.col("outcome").is_null())
    rejected = list(
        not_auth.select("row", pl.col("reject").fill_null(NOT_AUTH)).iter_rows()
    )
    events = shaped.filter(pl.col("reject").is_null() & pl.col("outcome").is_not_null())
    events = events.with_columns(_normalise_ips(events["ip_raw"]).alias("source_ip"))
    bad_ip = events.filter(pl.col("source_ip") == "")
    rejected += [(row, "invalid source IP address") for row in bad_ip["row"]]
    events = events.filter(pl.col("source_ip").is_null() | (pl.col("source_ip") != ""))
    if events.height == 0:
        return empty_events(), rejected

    service = _service(pl.col("svc"))
    account = pl.col("account").str.strip_chars().str.strip_chars("<>").str.slice(0, 256)
    events = events.join(times, on="row", how="left").select(
        "row",
        "ts",
        "source_ip",
        service.alias("service"),
        pl.when(service.is_not_null())
        .then(pl.concat_str([service, pl.when(pl.col("secure")).then(pl.lit("s")).otherwise(pl.lit(""))]))
        .alias("scheme"),
        "method",
        pl.lit(None, dtype=pl.String).alias("path"),
        "status",
        "outcome",
        pl.when(account.str.len_chars() > 0).then(account).alias("account"),
        "flags",
    )
    return conform(events.sort("row")), rejected
