"""The Prefect UI in a real browser: Debian's chromium driven by Playwright (no browser download;
`make bootstrap` installs chromium), on the stack `make server` starts.

A paused patch run is approved from its page (Resume, the form, Submit) and completes; a run is
started from a deployment's Custom run form with a parameter filled in, and runs with it. Each
run patches its own real sshd host (tests/hosts/patch_host.py). A failing test leaves a
screenshot of the page under .lab/screenshots/ and names it in its message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.hosts.chromium import chromium
from tests.hosts.lab_stack import (REPO, RunningStack, deployment, flow_run, paused, resume_from_ui, start_from_ui,
                                   wait_for_state)
from tests.hosts.patch_host import DEPLOYMENT, HostMaker

# The first test also waits for the shared stack to come up (a minute or more on a busy machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SCREENSHOTS = REPO / ".lab" / "screenshots"
# The run page re-reads the run on an interval of its own: a state change shows within that.
UI_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root chromium needs --no-sandbox; the stack is on 127.0.0.1, so no proxy either.
        launched = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--no-proxy-server"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_MS)
    yield context.new_page()
    context.close()


@contextmanager
def screenshot_on_failure(page: Any, name: str) -> Iterator[None]:
    """Around a test's steps in the browser (pytest does not hand a test's failure to its fixtures)."""
    try:
        yield
    except Exception as exc:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=shot, full_page=True)
        raise AssertionError(f"{exc}\nscreenshot of the page: {shot}") from exc


def form_field(page: Any, label: str) -> Any:
    """One property of the page's Prefect schema form (a run's parameters, a Resume form) by its label."""
    title = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$"))
    return page.locator(".schema-form-property", has=title).first


def run_with_config(stack: RunningStack, deployment_id: str, config: Path) -> str:
    """The id of the deployment's one run that reads config (each test's config is its own)."""
    with stack.api() as api:
        runs = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
    [run_id] = [run["id"] for run in runs if run["parameters"].get("config_path") == str(config)]
    return str(run_id)


def test_a_paused_run_is_approved_from_its_page_and_completes(
        ui_stack: RunningStack, patchable_host: HostMaker, page: Any) -> None:
    from playwright.sync_api import expect

    host = patchable_host("ui-browser-resume")
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    paused(ui_stack, run_id)
    with screenshot_on_failure(page, "approved-from-its-page"):
        page.goto(f"{ui_stack.ui_url}/runs/flow-run/{run_id}")
        expect(page.locator(".state-badge", has_text="Paused").first).to_be_visible(timeout=UI_MS)
        page.get_by_role("button", name="Resume").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("demo-web=1.1", timeout=UI_MS)  # the assessment summary is the form's description
        form_field(page, "Approve").get_by_role("switch").click()
        form_field(page, "Comment").locator("textarea").fill("approved in the browser")
        dialog.get_by_role("button", name="Submit").click()
        expect(page.locator(".state-badge", has_text="Completed").first).to_be_visible(timeout=UI_MS)

    run = wait_for_state(ui_stack, run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{ui_stack.logs()}"
    with ui_stack.api() as api:
        answer = api.get(f"/flow_runs/{run_id}/input/paused-approval-response").json()
    assert answer == {"approve": True, "reboot_outside_window": False, "comment": "approved in the browser"}
    assert host.demo_web() == "1.1"


def test_a_custom_run_from_the_deployment_form_runs_with_the_filled_parameter(
        ui_stack: RunningStack, patchable_host: HostMaker, page: Any) -> None:
    from playwright.sync_api import expect

    host = patchable_host("ui-browser-custom")
    shown = deployment(ui_stack, DEPLOYMENT)
    with screenshot_on_failure(page, "custom-run-form"):
        page.goto(f"{ui_stack.ui_url}/deployments/deployment/{shown['id']}/run")
        form_field(page, "config_path").locator("textarea").fill(str(host.config))
        page.get_by_role("button", name="Submit").click()
        # The form returns to the deployment's page, whose Runs list shows the new run.
        page.wait_for_url(re.compile(rf"/deployments/deployment/{shown['id']}(\?.*)?$"))
        run_id = run_with_config(ui_stack, shown["id"], host.config)
        page.goto(f"{ui_stack.ui_url}/runs/flow-run/{run_id}")
        page.get_by_text("Parameters", exact=True).click()
        expect(page.get_by_text(str(host.config)).first).to_be_visible(timeout=UI_MS)

    run = flow_run(ui_stack, run_id)
    # The filled parameter, and the deployment's own ones the form showed, reach the run.
    assert run["parameters"]["config_path"] == str(host.config)
    assert (run["parameters"]["groups"], run["parameters"]["policy"]) == (["web"], "monthly-web")
    # The lab's config would complete unpaused; pausing for approval shows the run read the filled one.
    paused(ui_stack, run_id)
    assert resume_from_ui(ui_stack, run_id, {"approve": False, "comment": "only checking the form"})["status"] == "ACCEPT"
    assert wait_for_state(ui_stack, run_id)["state"]["type"] == "CANCELLED"
    assert host.demo_web() == "1.0"
