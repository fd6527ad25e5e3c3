"""The per-module score of a mutation run (used by scripts/mutation).

    python mutation_report.py [--todo] MODULE...

Reads what `mutmut run` left in ./mutants (run from the repository root) and
the equivalent mutants listed in docs/testing.md, and prints one line per
module: mutants, killed, survived, equivalent, and the score
killed / (mutants - equivalent). Every survivor that docs/testing.md does not
explain is printed with its change. A row there whose reason starts with
"**Bug**" explains a survivor that shows a known bug: it stays a survivor.
A listed mutant counts only while its change is still the one written next
to it: when the code around it changes, mutmut's numbering moves and the
entry must be judged again. With --todo, unexplained survivors are printed
as table rows for docs/testing.md.

Exit status: 0 when every module reaches GOAL and no survivor is
unexplained; 1 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

GOAL = 90.0
DOC = Path("docs/testing.md")
MODULES = {
    "protocol": "edged/stt/protocol.py",
    "buffer": "edged/audio/buffer.py",
    "spool": "edged/audio/spool.py",
    "outbox": "edged/outbox.py",
    "policy": "edged/stt/policy.py",
    "storage": "edged/storage.py",
    "mqtt_backoff": "edged/mqtt/backoff.py",
}
KILLED = {"killed", "timeout", "caught by type check"}
# | `mutant name` | `the mutated line` | reason |
_ROW = re.compile(r"^\|\s*`(?P<name>edged\.[^`]+)`\s*\|\s*`(?P<change>[^`]*)`\s*\|"
                  r"\s*(?P<reason>.*?)\s*\|\s*$")


@dataclass(frozen=True)
class Listed:
    change: str  # the mutated line, normalised
    bug: bool  # a survivor that shows a known bug, not an equivalent


@dataclass
class Score:
    module: str
    total: int = 0
    killed: int = 0
    equivalent: int = 0
    survivors: list[tuple[str, str, str]] = field(default_factory=list)  # name, status, change
    bugs: int = 0  # survivors explained by a known bug
    stale: list[str] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return len(self.survivors) + self.bugs

    @property
    def score(self) -> float:
        judged = self.total - self.equivalent
        return 100.0 * self.killed / judged if judged else 100.0


def normalize(code: str) -> str:
    return " ".join(code.replace("\\|", "|").split())


def listed(doc: Path) -> dict[str, Listed]:
    """The survivors docs/testing.md explains, by name."""
    rows: dict[str, Listed] = {}
    if doc.exists():
        for line in doc.read_text().splitlines():
            match = _ROW.match(line)
            if match:
                rows[match["name"]] = Listed(normalize(match["change"]),
                                             match["reason"].startswith("**Bug**"))
    return rows


def change_of(name: str, path: str) -> str:
    """The mutated line(s) of a mutant, as one line."""
    diff = get_diff_for_mutant(name, path=path)
    added = [line[1:] for line in diff.splitlines()[2:] if line.startswith("+")]
    return normalize(" ".join(added))


def score_module(module: str, explained: dict[str, Listed]) -> Score | None:
    path = MODULES[module]
    meta = Path("mutants") / (path + ".meta")
    if not meta.exists():
        return None
    result = Score(module)
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        status = status_by_exit_code[code]
        result.total += 1
        if status in KILLED:
            result.killed += 1
            continue
        change = change_of(name, path)
        entry = explained.get(name)
        if entry is not None:
            if entry.change == change:
                if entry.bug:
                    result.bugs += 1
                else:
                    result.equivalent += 1
                continue
            result.stale.append(name)
        result.survivors.append((name, status, change))
    return result


def main(argv: list[str]) -> int:
    todo = "--todo" in argv
    modules = [arg for arg in argv if arg != "--todo"] or list(MODULES)
    explained = listed(DOC)
    scores = [s for s in (score_module(m, explained) for m in modules) if s is not None]
    if not scores:
        print("no results in ./mutants: run scripts/mutation first", file=sys.stderr)
        return 1

    unexplained = 0
    for s in scores:
        for name, status, change in s.survivors:
            unexplained += 1
            if todo:
                print(f"| `{name}` | `{change.replace('|', chr(92) + '|')}` | |")
            else:
                note = " (listed for another change: judge again)" if name in s.stale else ""
                print(f"  {status}: {name}{note}\n      {change}")
    if unexplained and not todo:
        print(f"\n{unexplained} surviving mutant(s) neither killed nor explained in {DOC}; "
              f"see one with: mutmut show NAME\n")

    print(f"{'module':<10} {'mutants':>8} {'killed':>7} {'survived':>9} {'equivalent':>11} "
          f"{'score':>7}")
    for s in scores:
        print(f"{s.module:<10} {s.total:>8} {s.killed:>7} {s.survived:>9} {s.equivalent:>11} "
              f"{s.score:>6.1f}%")
    total = Score("total", sum(s.total for s in scores), sum(s.killed for s in scores),
                  sum(s.equivalent for s in scores), bugs=sum(s.bugs for s in scores))
    total.survivors = [x for s in scores for x in s.survivors]
    print(f"{'total':<10} {total.total:>8} {total.killed:>7} {total.survived:>9} "
          f"{total.equivalent:>11} {total.score:>6.1f}%")
    below = [s.module for s in scores if s.score < GOAL]
    if below:
        print(f"below the goal of {GOAL:.0f} %: {', '.join(below)}")
    return 1 if below or unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
