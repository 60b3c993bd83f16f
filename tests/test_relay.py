"""The Jobs-API relay: a job's output folder travels back through its log (pure, no cluster)."""

import contextlib
import io

from farm.cluster.relay import pack, unpack


def test_a_folder_packed_into_a_log_unpacks_with_the_exit_code(tmp_path):
    src = tmp_path / "out"
    (src / "plots").mkdir(parents=True)
    (src / "report.md").write_text("# report\n")
    (src / "plots" / "a.png").write_bytes(bytes(range(256)) * 40)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        print("job chatter before")
        pack(str(src), 10)
    dest = tmp_path / "back"
    assert unpack("noise\n" + log.getvalue(), str(dest)) == 10
    assert (dest / "report.md").read_text() == "# report\n"
    assert (dest / "plots" / "a.png").read_bytes() == bytes(range(256)) * 40


def test_a_log_without_artefacts_is_none(tmp_path):
    assert unpack("Traceback: the job died early", str(tmp_path)) is None
