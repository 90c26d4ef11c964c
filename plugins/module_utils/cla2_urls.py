"""Credentials in URLs (user:password@host, token= and signature query parameters): what they are, and the
URL without them for messages. One copy, used by the `cla2.mlu.redact_url` filter (mlu_driver,
container_image) and by the cla2_weights module (model_weights).
"""

from __future__ import annotations

import re
import urllib.parse

# Query parameters that carry credentials (presigned S3/GCS/Azure URLs, API tokens): masked in all output.
SECRET_QUERY = re.compile(r"(?i)token|key|sig|secret|pass|auth|credential|session|signature|security")


def url_secrets(url):
    """The parts of a URL that are credentials: the user:password (or a token given as the user) and the
    values of query parameters such as token=, X-Amz-Signature=, sig=. Never printed nor returned."""
    out = set()
    try:
        parts = urllib.parse.urlsplit(url or "")
    except ValueError:
        return out
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        out.update([userinfo, urllib.parse.unquote(userinfo)])
        user, _, password = userinfo.partition(":")
        out.update(v for v in (password, urllib.parse.unquote(password)) if v)
        if not password:
            out.update(v for v in (user, urllib.parse.unquote(user)) if v)
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if value and SECRET_QUERY.search(key):
            out.update([value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)])
    return set(v for v in out if len(v) >= 3)


def redact(url, whole_query=True):
    """`url` without its credentials, for messages.

    The user info becomes `***@`. With `whole_query` (the roles' download URLs, whose query is usually a
    signature) any query becomes `?***` and the fragment is dropped: scheme://***@host/path?***; a URL with
    neither comes back unchanged. Without it only the values of secret-looking parameters are masked:
    https://***@host/path?token=***&x=1.
    """
    url = "" if url is None else str(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<the URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    if whole_query:
        if netloc == parts.netloc and not parts.query:
            return url
        return "%s://%s%s%s" % (parts.scheme, netloc, parts.path, "?***" if parts.query else "")
    query = "&".join("%s=%s" % (urllib.parse.quote(k, safe=""), "***" if v and SECRET_QUERY.search(k)
                                else urllib.parse.quote(v, safe=""))
                     for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
