"""/model shows admins what the current model runs on (the engine's kernel report), and no one else."""

from __future__ import annotations

from tests.test_core_service import say

SUMMARY = "toy-a: GPTQ 4-bit on CPU, our int4 kernel, 8-bit head, compiled"


async def test_admins_see_the_kernel_summary_in_the_model_listing(make_toy_service):
    async with make_toy_service() as service:
        service.queue.engine.kernel_summary = SUMMARY  # what TransformersEngine/LlamaCppEngine expose after a load
        admin = await say(service, "/model", is_admin=True)
        assert f"Running: {SUMMARY}" in admin.notices[0] and "* toy-a" in admin.notices[0]
        user = await say(service, "/model", is_admin=False)
        assert "Running:" not in user.notices[0] and "* toy-a" in user.notices[0]


async def test_an_engine_without_a_report_lists_models_as_before(make_toy_service):
    async with make_toy_service() as service:
        listing = await say(service, "/model", is_admin=True)
        assert "Running:" not in listing.notices[0] and listing.notices[0].endswith("Switch with /model NAME")
