"""The sweep across processes under ``torchrun`` (``configs/multi_gpu_sweep.json``): pairs split across processes,
rows gathered into the one ``sweep.csv`` a single process writes.

Process ``r`` of ``N`` scores every grid point of the pairs ``r, r + N, ...`` (:func:`share`: a pair's
pre-alignment is then computed once, by one process) and streams its rows to its own part of the table,
``sweep.csv.part<r>`` (:func:`part_path`, a :class:`~.sweep.SweepTable`: flushed row by row, a cut last line
dropped on resume). When every process has finished, process 0 merges the parts into ``sweep.csv``
(:func:`merge_parts`) in the order one process writes them (grid point, then the datalist's pair order), so the
table, and the summary derived from it, are a single process's (up to the ``seconds`` timings). A run interrupted
leaves its parts; the next run, with any number of processes, merges them first and computes only the missing rows.
Without a process group (or with one process) the sweep is the single-process one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist

from ..atomic import atomic_write_text
from .sweep import SweepTable

__all__ = ["share", "part_path", "merge_parts"]

#: a part of the table written by one process: ``sweep.csv.part<rank>``
PART_SUFFIX = ".part"


def share(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of ``items``: every ``world_size``-th one from index ``rank`` (default: this process in
    the ``ignite.distributed`` group; all items without one)."""
    rank = idist.get_rank() if rank is None else int(rank)
    world_size = idist.get_world_size() if world_size is None else int(world_size)
    return list(items[rank::world_size])


def part_path(table: str | Path, rank: int) -> Path:
    """The part of ``table`` that process ``rank`` writes (``sweep.csv`` -> ``sweep.csv.part<rank>``)."""
    table = Path(table)
    return table.with_name(f"{table.name}{PART_SUFFIX}{int(rank)}")


def merge_parts(table: str | Path, columns: Sequence[str], pair_order: Sequence[str]) -> int:
    """Merge every part of ``table`` (:func:`part_path`, left by this run's processes or an interrupted one) into
    ``table``: each ``(grid_index, pair_id)`` row once (the table's own row kept over a part's), every row sorted by
    grid index, then by the pair's place in ``pair_order`` (pairs not in it last, by id). The table is rewritten
    atomically, then the parts deleted; returns the number of rows taken from the parts (0: nothing to merge, the
    table untouched).

    Raises:
        ValueError: a part's header differs from ``columns`` (it belongs to another configuration).
    """
    table = Path(table)
    parts = sorted(table.parent.glob(f"{table.name}{PART_SUFFIX}*"))
    if not parts:
        return 0
    grid, pair = list(columns).index("grid_index"), list(columns).index("pair_id")
    rows: dict[tuple[int, str], list[str]] = {}
    taken = 0
    for path in [table, *parts] if table.is_file() else parts:
        SweepTable(path, columns)  # checks the header, drops a last line cut by an interruption
        with path.open(newline="") as handle:
            for values in list(csv.reader(handle))[1:]:
                key = (int(values[grid]), values[pair])
                if len(values) == len(columns) and key not in rows:
                    rows[key] = values
                    taken += path != table
    place = {pair_id: index for index, pair_id in enumerate(pair_order)}
    order = sorted(rows, key=lambda key: (key[0], place.get(key[1], len(place)), key[1]))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(list(columns))
    writer.writerows(rows[key] for key in order)
    atomic_write_text(table, text.getvalue())
    for path in parts:
        path.unlink()
    return taken
