"""The judges each served task gets under the server's settings: one answer for `firm-serve` and
for `firm-serve prompts show`, so what `show` prints is what a served call carries."""

from __future__ import annotations

import dataclasses

from clients.protocol import Task
from server.judges import Judge
from server.prompts.release import PromptSource
from server.prompts.sets import ReleasedPrompts, judges_for
from server.settings import Settings
from server.tasks import SERVER_TASKS


def released_prompts(settings: Settings) -> ReleasedPrompts:
    """The release's prompts from the settings' source, fetched and verified on first need."""
    source = PromptSource(settings.prompt_source, settings.cache_dir, allow_drift=settings.allow_prompt_drift)
    return ReleasedPrompts(source)


def task_judges(settings: Settings, task: Task, model: str, released: ReleasedPrompts) -> tuple[Judge, ...]:
    """The judges of `task` for `model`, in dimension order: the prompt set the settings give it, with
    the task's token budget."""
    names = SERVER_TASKS[task].judges
    chosen = judges_for(model, names, settings.prompts, released, settings.template_overrides())
    budget = settings.max_new_tokens(task)
    return tuple(dataclasses.replace(chosen[name], max_new_tokens=budget) for name in names)
