"""Hostile archives and manifests, on the host side.

Each refused upload is paired with an allowed twin, so a server that
refuses everything cannot pass.
"""

import bz2
import gzip
import io
import json
import tarfile
import zipfile

import pytest

from conftest import make_tar

MAIN = ("main.py", "file", b"import os\nfor root, dirs, files in sorted(os.walk('.')):\n"
                            b"    for n in sorted(dirs + files): print(os.path.join(root, n), os.path.islink(os.path.join(root, n)))\n")

REFUSED = [
    # id, members, status, words the details must contain
    ("absolute_path", [("/etc/cron.d/x", "file", b"x")], 400, "absolute"),
    ("dotdot", [("../../escape.py", "file", b"x")], 400, "'..'"),
    ("dotdot_inside", [("a/../../b", "file", b"x")], 400, "'..'"),
    ("symlink_absolute", [("link", "symlink", "/etc/passwd")], 400, "link target"),
    ("symlink_dotdot", [("link", "symlink", "../../etc/passwd")], 400, "outside"),
    ("symlink_chain_escape", [("d/up", "symlink", ".."), ("esc", "symlink", "d/up/..")], 400, "outside"),
    ("write_through_symlink", [("d", "symlink", "."), ("d/x.py", "file", b"x")], 400, "runs through a symlink"),
    ("hardlink_outside", [("h", "hardlink", "/etc/shadow")], 400, "absolute"),
    ("hardlink_to_nothing", [("h", "hardlink", "nothere")], 400, "hard link"),
    ("fifo", [("pipe", "fifo", None)], 400, "FIFO"),
    ("char_device", [("mem", "chr", None)], 400, "devices"),
    ("duplicate", [("x.txt", "file", b"1"), ("x.txt", "file", b"2")], 400, "twice"),
    ("control_chars", [("evil\nname", "file", b"x")], 400, "control characters"),
    ("long_component", [("a" * 256, "file", b"x")], 400, "longer than"),
]

ALLOWED = [
    ("in_tree_symlink", [("data/real.txt", "file", b"r"), ("alias.txt", "symlink", "data/real.txt")], "./alias.txt True"),
    ("symlink_to_parent_inside", [("d/e/f.txt", "file", b"f"), ("d/e/up", "symlink", "..")], "./d/e/up True"),
    ("hardlink_inside", [("a.txt", "file", b"a"), ("b.txt", "hardlink", "a.txt")], "./b.txt False"),
    ("dot_slash_names", [("./x/y.txt", "file", b"y")], "./x/y.txt False"),
    ("empty_dir", [("empty", "dir", None)], "./empty False"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_unsafe_archive_member_is_refused(server, case):
    _, members, status, words = case
    code, _, body = server.submit_files([("job.tar.gz", make_tar([MAIN] + members))], {"entrypoint": "main.py"})
    doc = json.loads(body)
    assert code == status, doc
    assert set(doc) >= {"error", "details"} and words in doc["details"], doc


@pytest.mark.parametrize("case", ALLOWED, ids=[c[0] for c in ALLOWED])
def test_safe_archive_member_is_unpacked(server, case):
    _, members, line = case
    code, _, body = server.submit_files([("job.tar.gz", make_tar([MAIN] + members))], {"entrypoint": "main.py"})
    doc = json.loads(body)
    assert code == 200 and doc["status"] == "completed", doc
    _, _, logs = server.json("GET", f"/logs/{doc['job_id']}")
    assert line in logs["stdout"].splitlines(), logs


def test_zip_symlink_escape_refused_and_in_tree_allowed(server):
    def zip_with_link(target):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("main.py", "import os; print(os.readlink('l'))")
            info = zipfile.ZipInfo("l")
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
        return buf.getvalue()

    code, _, body = server.submit_files([("j.zip", zip_with_link("/etc/shadow"))], {"entrypoint": "main.py"})
    assert code == 400 and "link" in json.loads(body)["details"]
    code, _, body = server.submit_files([("j.zip", zip_with_link("main.py"))], {"entrypoint": "main.py"})
    doc = json.loads(body)
    assert code == 200 and doc["status"] == "completed", doc


def test_plain_file_part_with_traversal_name_is_refused(server):
    code, _, body = server.submit_files([("main.py", b"print(1)"), ("../../etc/x", b"x")], {"entrypoint": "main.py"})
    assert code == 400 and "'..'" in json.loads(body)["details"]
    code, _, body = server.submit_files([("main.py", b"print(1)"), ("sub/dir/x", b"x")], {"entrypoint": "main.py"})
    assert code == 200


def test_too_many_members_is_413(server):
    members = [MAIN] + [(f"f{i}", "file", b"") for i in range(10_001)]
    code, _, body = server.submit_files([("many.tar", make_tar(members, "w"))], {"entrypoint": "main.py"})
    assert code == 413 and "10000" in json.loads(body)["details"]


def test_decompression_bomb_is_stopped_while_unpacking(server):
    # 200 MiB of zeros inside one member, about 200 KiB on the wire; the member's
    # declared size trips the cap before its bytes are copied.

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        tar.addfile(tarfile.TarInfo("main.py"), io.BytesIO(b""))
        info = tarfile.TarInfo("zeros")
        info.size = 200 * 1024 * 1024

        class Zeros(io.RawIOBase):
            def readinto(self, b):
                b[:] = bytes(len(b))
                return len(b)

        tar.addfile(info, Zeros())
    assert len(buf.getvalue()) < 1024 * 1024
    code, _, body = server.submit_files([("bomb.tar.bz2", buf.getvalue())], {"entrypoint": "main.py"})
    assert code == 413 and "104857600" in json.loads(body)["details"], body


def test_bomb_of_headers_is_stopped_before_tarfile_reads_it(server):
    # A gzip stream of 300 MiB after a valid tar header, announced by a PAX header
    # that tarfile would read whole into memory: its size is refused first.
    raw = make_tar([MAIN], "w")[:512 + 512]  # header and data block of main.py, no end marker
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb") as g:
        g.write(raw)
        # a pax header claiming a 300 MiB extended record, which tarfile would read into memory
        chunk = b"x" * (1024 * 1024)
        header = bytearray(512)
        header[0:9] = b"PaxHeader"
        header[100:108] = b"0000644\0"
        header[124:136] = b"%011o\0" % (300 * 1024 * 1024)
        header[156:157] = b"x"
        header[257:263] = b"ustar\0"
        header[263:265] = b"00"
        header[148:156] = b"        "
        header[148:156] = b"%06o\0 " % sum(header)
        g.write(bytes(header))
        for _ in range(300):
            g.write(chunk)
    assert len(bomb.getvalue()) < 2 * 1024 * 1024
    code, _, body = server.submit_files([("bomb.tgz", bomb.getvalue())], {"entrypoint": "main.py"})
    assert code == 413 and b"PAX header" in body, body


def test_unpacked_size_over_cap_is_413_and_under_is_accepted(server):
    big = b"\0" * (60 * 1024 * 1024)
    members = [MAIN, ("a.bin", "file", big), ("b.bin", "file", big)]
    code, _, body = server.submit_files([("big.tar.bz2", make_tar(members, "w:bz2"))], {"entrypoint": "main.py"})
    assert code == 413, body
    code, _, body = server.submit_files([("ok.tar.bz2", make_tar(members[:2], "w:bz2"))], {"entrypoint": "main.py", "outputs": []})
    assert code == 200 and json.loads(body)["status"] == "completed", body


def test_body_over_upload_cap_is_413_before_reading(server):
    status, _, body = server.request("POST", "/submit", b"",
                                     {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(200 * 1024 * 1024)})
    assert status == 413 and json.loads(body)["error"] == "body too large"


@pytest.mark.parametrize("manifest,words", [
    ('{"entrypoint": "main.py", "entrypoint": "x.py"}', "duplicate key"),
    ('{"entrypoint": "main.py", "timeout": NaN}', "NaN"),
    ('{"entrypoint": "main.py", "timeout": Infinity}', "Infinity"),
    ('{"entrypoint": "main.py", "timeout": "10"}', "'timeout' must be"),
    ('{"entrypoint": "main.py", "timeout": 0}', "'timeout' must be > 0"),
    ('{"entrypoint": "main.py", "timeout": 301}', "<= 300"),
    ('{"entrypoint": "main.py", "memory_mb": 8}', "'memory_mb' must be within 16..512"),
    ('{"entrypoint": "main.py", "memory_mb": 100.5}', "'memory_mb' must be an integer"),
    ('{"entrypoint": "main.py", "args": ["a\\u0000b"]}', "NUL"),
    ('{"entrypoint": "main.py", "args": [1]}', "'args' must be strings"),
    ('{"entrypoint": "main.py", "env": {"1BAD": "x"}}', "'env' names"),
    ('{"entrypoint": "main.py", "env": {"OK": 1}}', "'env' value"),
    ('{"entrypoint": "main.py", "interpreter": "cobol"}', "not available"),
    ('{"entrypoint": "main.py", "outputs": "*.png"}', "'outputs' must be"),
    ('{"entrypoint": "nothere.py"}', "is not an uploaded file"),
    ('{"entrypoint": "/etc/passwd"}', "absolute"),
    ('{"interpreter": "python3"}', "'entrypoint' is required"),
    ('["main.py"]', "JSON object"),
    ("{not json", "not strict JSON"),
])
def test_bad_manifest_is_400(server, manifest, words):
    code, _, body = server.submit_files([("main.py", b"print(1)")], manifest)
    doc = json.loads(body)
    assert code == 400 and words in doc["details"], doc


def test_manifest_limits_args_and_stdin(server):
    status, _, doc = server.json("POST", "/submit", {"code": "1", "interpreter": "python3", "args": ["a"] * 257})
    assert status == 400 and "256" in doc["details"]
    status, _, doc = server.json("POST", "/submit", {"code": "1", "interpreter": "python3", "stdin": "x" * (1024 * 1024 + 1)})
    assert status == 400 and "stdin" in doc["details"]
    status, _, doc = server.json("POST", "/submit?wait=30", {"code": "import sys; print(len(sys.stdin.read()))", "interpreter": "python3",
                                                             "args": ["a"] * 256, "stdin": "x" * (1024 * 1024), "unknown_field": True})
    assert status == 200 and doc["status"] == "completed", doc


def test_json_form_requires_interpreter_and_code(server):
    status, _, doc = server.json("POST", "/submit", {"code": "print(1)"})
    assert status == 400 and "'interpreter' is required" in doc["details"]
    status, _, doc = server.json("POST", "/submit", {"interpreter": "python3"})
    assert status == 400 and "'code'" in doc["details"]
    status, _, body = server.request("POST", "/submit", b'{"code": "1", "interpreter": "python3", "code": "2"}', {"Content-Type": "application/json"})
    assert status == 400 and b"duplicate key" in body


def test_json_body_over_2_mib_is_413(server):
    status, _, body = server.request("POST", "/submit", b"{" + b" " * (2 * 1024 * 1024 + 10) + b"}", {"Content-Type": "application/json"})
    assert status == 413


def test_compressed_bz2_is_recognised_by_bytes_not_name(server):
    archive = bz2.compress(make_tar([("main.py", "file", b"print('bz2')")], "w"))
    status, _, body = server.submit_files([("looks-like.txt", archive)], {"entrypoint": "main.py"})
    assert status == 200 and json.loads(body)["status"] == "completed", body
