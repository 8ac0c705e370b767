"""Multi-statement SQL scripts (migrations, imports): split into statements and vet each one.

Scripts run on the tenant's admin connection inside one transaction. PostgreSQL's own grammar
(tenancy.statements, pglast) finds where each statement ends — strings, E'' escapes, quoted and
U& identifiers, dollar quotes, comments ending at `\\r` as well as `\\n`, nested block comments,
`BEGIN ATOMIC ... END` bodies — and what each one is; a script that does not parse is refused
rather than guessed at. The refusals are tenancy.statements.RULES in the script context.
"""

from __future__ import annotations

from fluxbase.tenancy import statements as classification


class ScriptError(ValueError):
    """The script cannot be split safely or contains a statement that is not allowed."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def split_statements(script: str) -> list[str]:
    """The script's statements (without the trailing `;`), empty ones dropped."""
    try:
        return classification.split(script)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None


def check_statement(stmt: str, index: int, classifier: classification.Classifier | None = None) -> None:
    """Refuse what tenancy.statements refuses in a script: transaction control, session state,
    role switches and role administration, the request identity, settings above the caps, large
    objects, VACUUM."""
    verdict = (classifier or classification.default()).classify(stmt)
    refused = verdict.refusal(classification.SCRIPT)
    if refused is not None:
        raise ScriptError(f"statement {index}: {refused.message}", index)
