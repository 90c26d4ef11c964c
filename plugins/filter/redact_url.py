"""The cla2.mlu.redact_url filter: a URL without its credentials, for messages (plugins/module_utils/cla2_urls.py)."""

from __future__ import annotations

from ansible_collections.cla2.mlu.plugins.module_utils.cla2_urls import redact

DOCUMENTATION = r"""
name: redact_url
short_description: A URL without its credentials, for messages
description:
  - Masks the user info (C(user:password@) becomes C(***@)) and, by default, the whole query (C(?***)), which
    for a download URL is usually a token or a signature; a URL with neither comes back unchanged.
  - So C(url | cla2.mlu.redact_url != url) tells whether a URL carries a secret (its tasks then run C(no_log)).
version_added: 0.1.0
author: cla2 kit
options:
  _input:
    description: The URL.
    type: str
    required: true
  whole_query:
    description:
      - Mask the whole query. When false, only the values of parameters whose name looks like a credential
        (token, key, sig, secret, pass, auth, credential, session, signature, security).
    type: bool
    default: true
"""

EXAMPLES = r"""
shown: "{{ 'https://u:pw@mirror/pkg.deb?X-Amz-Signature=abc' | cla2.mlu.redact_url }}"
# => https://***@mirror/pkg.deb?***
partial: "{{ 'https://mirror/m/?token=abc&x=1' | cla2.mlu.redact_url(whole_query=false) }}"
# => https://mirror/m/?token=***&x=1
"""

RETURN = r"""
_value:
  description: The URL without its credentials.
  type: str
"""


class FilterModule:
    def filters(self):
        return {"redact_url": redact}
