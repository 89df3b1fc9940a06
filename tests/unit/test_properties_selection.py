"""Property tests of patch selection (tasks/patching/plan/selection): in a month whose calendar
allows everything, an update installs exactly when no exclude entry names it and an include
entry or its classification selects it; an exclusion always wins; adding an include never
drops an update, adding an exclude never adds one; a KB number matches in every spelling."""

from __future__ import annotations

from datetime import date, datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from configs.policies import Classification, PatchPolicy
from tasks.patching.models import ComplianceState, Enrollment, Update
from tasks.patching.plan.selection import decide, matches, select

QUICK = settings(max_examples=150, deadline=None)
TODAY = date(2026, 1, 20)
LINUX = Enrollment(host="web1", os_family="linux", os_name="Debian GNU/Linux 12", package_manager="apt",
                   reboot_detection="reboot-required-file", boot_id="b",
                   enrolled_at=datetime(2026, 1, 1, tzinfo=timezone.utc))

PACKAGES = ["openssl", "openssh-server", "libssl3", "web", "kernel-image"]
KB_DIGITS = ["5034441", "5034442", "123456", "12345678"]
classifications = st.sampled_from(list(Classification))


def kb_spellings(digits: str) -> st.SearchStrategy[str]:
    return st.sampled_from([f"KB{digits}", f"kb{digits}", digits, f" Kb{digits} "])


windows_updates = st.tuples(st.sampled_from(KB_DIGITS), classifications).flatmap(
    lambda kb: kb_spellings(kb[0]).map(lambda spelled: Update(id=spelled.strip(), classification=kb[1])))
linux_updates = st.builds(
    lambda names, classification: Update(id=f"{names[0]}=1.1", packages=names, classification=classification),
    st.lists(st.sampled_from(PACKAGES), min_size=1, max_size=2, unique=True), classifications)
updates = windows_updates | linux_updates
# Entries that name some of the updates above, by KB (any spelling), name or mask, and some none.
entries = st.one_of(st.sampled_from(KB_DIGITS).flatmap(kb_spellings), st.sampled_from(PACKAGES),
                    st.sampled_from(["open*", "lib*", "*ssl*", "web=*", "*", "nothing-here", "KB9999999"]))
policies = st.builds(PatchPolicy, classifications=st.lists(classifications, unique=True, max_size=4),
                     include=st.lists(entries, max_size=3), exclude=st.lists(entries, max_size=3))


@QUICK
@given(updates, policies)
def test_an_update_installs_exactly_when_the_rules_select_it(update: Update, policy: PatchPolicy) -> None:
    excluded_by = [e for e in policy.exclude if matches(e, update)]
    included = any(matches(e, update) for e in policy.include)
    decision = decide(update, policy, LINUX, "baseline", TODAY)
    assert decision.install == (not excluded_by and (included or update.classification in policy.classifications))
    assert decision.state is (ComplianceState.MISSING if decision.install else ComplianceState.EXCLUDED)
    if excluded_by:
        assert decision.reason == f"excluded by {excluded_by[0]!r}"


@QUICK
@given(updates, policies, st.data())
def test_an_exclusion_always_wins(update: Update, policy: PatchPolicy, data: st.DataObject) -> None:
    naming = data.draw(st.sampled_from([update.id, *update.packages, *([update.kb] if update.kb else [])]))
    everything = policy.model_copy(update={"include": [*policy.include, naming, "*"], "exclude": [*policy.exclude, naming],
                                           "classifications": list(Classification)})
    decision = decide(update, everything, LINUX, "baseline", TODAY)
    assert not decision.install and decision.state is ComplianceState.EXCLUDED


@QUICK
@given(st.lists(updates, max_size=6), policies, entries)
def test_an_include_only_adds_and_an_exclude_only_removes(batch: list[Update], policy: PatchPolicy, entry: str) -> None:
    before = [d.install for d in select(batch, policy, LINUX, "baseline", TODAY)]
    wider = [d.install for d in select(batch, policy.model_copy(update={"include": [*policy.include, entry]}),
                                       LINUX, "baseline", TODAY)]
    narrower = [d.install for d in select(batch, policy.model_copy(update={"exclude": [*policy.exclude, entry]}),
                                          LINUX, "baseline", TODAY)]
    assert all(w or not b for b, w in zip(before, wider)) and all(b or not n for b, n in zip(before, narrower))
    # One decision per update, in the order given.
    assert [d.update for d in select(batch, policy, LINUX, "baseline", TODAY)] == batch


@QUICK
@given(st.sampled_from(KB_DIGITS).flatmap(lambda d: st.tuples(kb_spellings(d).map(str.strip), kb_spellings(d))))
def test_a_kb_number_matches_in_every_spelling(spellings: tuple[str, str]) -> None:
    update_id, entry = spellings
    assert matches(entry, Update(id=update_id))
    assert not matches("KB9999999", Update(id=update_id))
