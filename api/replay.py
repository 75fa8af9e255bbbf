"""The answer to a retried request whose first answer is stored (`shared.idempotency`): the
same status and body, marked so that the client can tell nothing was done twice."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from shared.idempotency import StoredResponse

REPLAYED_HEADER = "Idempotent-Replayed"


def replayed(earlier: StoredResponse) -> JSONResponse:
    return JSONResponse(earlier.body, earlier.status, headers={REPLAYED_HEADER: "true"})
