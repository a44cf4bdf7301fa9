"""Why a job has its status, in one line. Pure: a ``JobView`` in, text out.

``jobs show``, the demo and the web dashboard print this same line, so the three never tell
an operator different stories about one job.
"""

from __future__ import annotations

from consumers.state import HistoryRow, Outcome
from consumers.store import JobView

NOTHING_APPLIED = "no event has set its status"


def deciding_row(job: JobView) -> HistoryRow | None:
    """The latest applied history row that left the job in its current status."""
    for row in reversed(job.history):
        if row.outcome is Outcome.APPLIED and row.status_after == job.status:
            return row
    return None


def why(job: JobView) -> str:
    """What gave the job its status, and the server's own verdict where it differs.

    ``fail by nvflare-2.8:fail-on-exception (site-1 CONFIG_ERROR rc=103); server verdict
    FINISHED:ABNORMAL differs`` or ``server verdict FINISHED:COMPLETED``.
    """
    row = deciding_row(job)
    text = NOTHING_APPLIED if row is None else _cause(row)
    server = job.server_status
    if server is not None and server != job.status:
        text += f"; server verdict {server.value} differs"
    return text


def _cause(row: HistoryRow) -> str:
    if row.kind == "lifecycle":
        return f"server verdict {row.action}"
    rule = f"{row.policy.name}:{row.policy.rule}" if row.policy else "?"
    return f"{row.action} by {rule} ({row.site} {row.code}{rc_text(row.return_code)})"


def rc_text(return_code: int | None) -> str:
    """`` rc=N`` after a code's name; nothing when the exit gave only the name."""
    return "" if return_code is None else f" rc={return_code}"
