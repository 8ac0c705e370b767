"""Row images in events are whole rows, whatever the table's columns are called.

The statement-level capture triggers build images from their transition tables; a column named
like the transition table's alias must not be taken for the row (found while building realtime
v2: a column `n` made every INSERT event carry that column's value instead of the row)."""

from __future__ import annotations

from typing import Any

from support import Api
from test_realtime import rt, subscribe  # noqa: F401 - fixture


async def test_images_are_whole_rows_even_with_columns_named_like_aliases(
    api: Api,
    project: Any,
    rt: str,  # noqa: F811
) -> None:
    key = project.admin_key
    q = "CREATE TABLE alias_clash (id int PRIMARY KEY, n text, o text, new_rows text, old_rows text)"
    assert (await api.sql(key, project.id, q)).json()["success"]
    whole = {"id": 1, "n": "N", "o": "O", "new_rows": "NR", "old_rows": "OR"}
    async with subscribe(rt, project.id, key, tables=["alias_clash"]) as sub:
        for q in (
            "INSERT INTO alias_clash VALUES (1, 'N', 'O', 'NR', 'OR')",
            "UPDATE alias_clash SET n = 'N2' WHERE id = 1",
            "DELETE FROM alias_clash WHERE id = 1",
        ):
            assert (await api.sql(key, project.id, q)).json()["success"], q
        ins, upd, dele = await sub.rows(3)
    assert ins["payload"]["record"] == whole
    assert upd["payload"]["record"] == {**whole, "n": "N2"} and upd["payload"]["old"] == whole
    assert dele["payload"]["old"] == {**whole, "n": "N2"}
