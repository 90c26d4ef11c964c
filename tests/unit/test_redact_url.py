"""cla2.mlu.redact_url (plugins/module_utils/cla2_urls.py): one redaction of credentials in URLs, used by
mlu_driver and container_image (the filter) and the cla2_weights module; the roles' end-to-end checks
are test_credential_urls.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(KIT / "collections"))

from ansible_collections.cla2.mlu.plugins.filter.redact_url import FilterModule
from ansible_collections.cla2.mlu.plugins.module_utils.cla2_urls import (
    redact,
    url_secrets,
)


@pytest.mark.parametrize(("url", "shown"), [
    ("http://u:pw@h:8/p/f.deb?token=t&x=1", "http://***@h:8/p/f.deb?***"),
    ("https://h/p/f.deb?X-Amz-Signature=abc", "https://h/p/f.deb?***"),
    ("https://tok@h/p", "https://***@h/p"),
    ("https://h/p/f.deb", "https://h/p/f.deb"),
    ("", ""),
])
def test_the_roles_mask_user_info_and_the_whole_query(url, shown):
    assert redact(url) == shown
    assert FilterModule().filters()["redact_url"](url) == shown


def test_the_module_masks_only_secret_parameters():
    assert redact("https://u:pw@h/m/?token=abc&x=1", whole_query=False) == "https://***@h/m/?token=***&x=1"


def test_the_secrets_of_a_url():
    assert {"u:pw42", "pw42", "abcdef"} <= url_secrets("https://u:pw42@h/m/?token=abcdef&x=1")
    assert url_secrets("https://h/m/?x=1") == set()
