"""The saga admin shows runs and their step logs, and changes nothing (a run moves only through the runner)."""

import uuid

import pytest

from iot.saga import saga_start
from iot.saga.testing import saga_drive
from iot.testing.factories import user_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("effects_table")]


@pytest.fixture
def superuser(client):
    client.force_login(user_create(superuser=True))
    return client


@pytest.fixture
def failed_run():
    key = f"adm-{uuid.uuid4().hex}"
    run_id = saga_start(name="test.abc", key=key, context={"plan": {"c": {"fail": "checksum mismatch"}}})
    saga_drive(run_id=run_id)
    return run_id, key


def test_the_run_list_and_detail_show_the_run_and_its_step_log(superuser, failed_run):
    run_id, key = failed_run
    listing = superuser.get("/admin/saga/sagarun/", {"q": key})
    assert listing.status_code == 200
    assert str(run_id) in listing.content.decode() and "compensated" in listing.content.decode()
    detail = superuser.get(f"/admin/saga/sagarun/{run_id}/change/")
    assert detail.status_code == 200
    content = detail.content.decode()
    assert "checksum mismatch" in content and content.count("compensate") >= 2
    assert 'name="_save"' not in content  # read-only: no save button, even for a superuser
    logs = superuser.get("/admin/saga/sagasteplog/", {"q": str(run_id)})
    assert logs.status_code == 200 and logs.content.decode().count("compensate") >= 2


def test_nothing_can_be_added_changed_or_deleted(superuser, failed_run):
    run_id, _ = failed_run
    assert superuser.get("/admin/saga/sagarun/add/").status_code == 403
    assert superuser.post(f"/admin/saga/sagarun/{run_id}/change/", {"status": "running"}).status_code == 403
    assert superuser.post(f"/admin/saga/sagarun/{run_id}/delete/", {"post": "yes"}).status_code == 403


def test_a_staff_user_without_the_view_permission_sees_nothing(client, failed_run):
    client.force_login(user_create(staff=True))
    assert client.get("/admin/saga/sagarun/").status_code == 403
