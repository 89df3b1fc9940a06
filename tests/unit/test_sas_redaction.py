"""SAS tokens are redacted by their shape, wherever they appear, without being registered."""

from __future__ import annotations

import pytest

from configs.secrets import redact, remembered_count

SIGNATURE = "q8Vd3%2BxYz0abcDEF%3D"
QUERY = f"sv=2025-01-05&se=2026-12-01T23%3A00%3A00Z&sr=b&sp=cw&spr=https&sig={SIGNATURE}"


@pytest.mark.parametrize("text, kept", [
    (f"PUT https://acct.blob.core.windows.net/c/staging/h/d/r/7?{QUERY} failed: 403",
     ["PUT https://acct.blob.core.windows.net/c/staging/h/d/r/7?***", "failed: 403"]),
    (f"BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature={QUERY};QueueEndpoint=x",
     ["BlobEndpoint=https://acct.blob.core.windows.net;", ";QueueEndpoint=x"]),
    (f"url='https://h/c/k?SIG={SIGNATURE}&se=1'", ["url='https://h/c/k?***'"]),
    (f'{{"url": "https://h/c/k?sp=cw&sig={SIGNATURE}"}}', ['{"url": "https://h/c/k?***"}']),
])
def test_every_sas_query_is_masked_whole(text: str, kept: list[str]) -> None:
    before = remembered_count()
    masked = redact(text)
    assert SIGNATURE not in masked and "sp=cw" not in masked and "se=" not in masked
    assert all(part in masked for part in kept), masked
    assert remembered_count() == before


def test_text_without_a_signature_is_left_alone() -> None:
    text = "design=1&signature_count=2 sig= nosig=3"
    assert redact(text) == text
