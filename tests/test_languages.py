"""C and C++ as languages: compiled and run inside the job's own jail, under its limits.

`make test` installs gcc and g++; jobs see the host's /usr.
"""

import pytest
from conftest import SUITE_ENV, Server, make_tar

HELLO = {
    "c": '#include <stdio.h>\n#include <math.h>\nint main(int argc, char **argv) {\n    char line[64] = "";\n'
         '    fgets(line, sizeof line, stdin);\n    printf("%s %d %.3f %s", argv[1], argc, sqrt(2.0), line);\n    return 0;\n}\n',
    "cpp": '#include <cmath>\n#include <iostream>\n#include <string>\nint main(int argc, char **argv) {\n'
           '    std::string line;\n    std::getline(std::cin, line);\n'
           '    std::cout << argv[1] << " " << argc << " " << std::sqrt(2.0) << " " << line << std::endl;\n}\n',
}


@pytest.mark.parametrize("language, expected", [("c", "hello 2 1.414 stdin line\n"), ("cpp", "hello 2 1.41421 stdin line\n")])
def test_hello_with_args_and_stdin(server, language, expected):
    doc, logs = server.run(HELLO[language], language, args=["hello"], stdin="stdin line\n")
    assert (doc["status"], doc["reason"], logs["stdout"], logs["stderr"]) == ("completed", "exit_code", expected, ""), (doc, logs)
    assert doc["execution_metadata"]["interpreter"] == language


@pytest.mark.parametrize("language", ["c", "cpp"])
def test_a_compile_error_ends_the_job_with_the_compilers_messages(server, language):
    doc, logs = server.run("int main() { return undeclared_name; }\n", language)
    assert (doc["status"], doc["reason"], doc["exit_code"]) == ("failed", "compile_error", 1), doc
    assert "undeclared_name" in logs["stderr"] and "error" in logs["stderr"] and logs["stdout"] == "", logs


@pytest.mark.parametrize("language, code", [
    ("c", "#include <stdlib.h>\nint main(void) { int *p = NULL; return *p; }\n"),
    ("cpp", "#include <stdexcept>\nint main() { throw std::runtime_error(\"boom\"); }\n"),
])
def test_a_runtime_error_is_the_programs_not_the_compilers(server, language, code):
    doc, logs = server.run(code, language)
    assert (doc["status"], doc["reason"]) == ("failed", "signal"), (doc, logs)  # SIGSEGV; SIGABRT from terminate
    assert doc["signal"] in (6, 11), doc


def test_a_compile_warning_is_on_stderr_and_the_program_runs(server):
    doc, logs = server.run("#include <stdio.h>\nint main(void) { int unused; puts(\"ran\"); return 3; }\n", "c")
    assert (doc["status"], doc["reason"], doc["exit_code"], logs["stdout"]) == ("failed", "exit_code", 3, "ran\n"), (doc, logs)
    assert "unused" in logs["stderr"], logs


def test_sources_and_headers_are_compiled_together_and_read_a_data_file(server):
    """An upload with the entrypoint in a folder, a second source in another, a header, and data:
    every .cpp is compiled, headers are found beside them, the program reads the data in /work."""
    archive = make_tar([
        ("src/main.cpp", "file", b'#include <fstream>\n#include <iostream>\n#include "sum.h"\n'
                                 b'int main() { std::ifstream in("data/numbers.txt"); long x, t = 0;\n'
                                 b'  while (in >> x) t += x;\n  std::cout << twice(t) << std::endl;\n}\n'),
        ("lib/sum.cpp", "file", b'#include "../src/sum.h"\nlong twice(long v) { return 2 * v; }\n'),
        ("src/sum.h", "file", b"long twice(long v);\n"),
        ("data/numbers.txt", "file", b"1 2 3\n4\n"),
        ("notes.c", "file", b"this is C, not C++: never compiled with the C++ sources\n"),
    ])
    doc, logs = server.run_files([("job.tar.gz", archive)], {"entrypoint": "src/main.cpp"})
    assert (doc["status"], logs["stdout"], logs["stderr"]) == ("completed", "20\n", ""), (doc, logs)
    assert doc["execution_metadata"]["interpreter"] == "cpp"  # from the extension


def test_the_compiler_counts_against_the_jobs_memory():
    """A translation unit the compiler cannot hold in 24 MiB: the job ends memory_limit, the runner carries on."""
    srv = Server(SUITE_ENV, "cc-memory").start()
    try:
        code = "".join(f"int f{i}(int x) {{ return x * {i} + {i % 7}; }}\n" for i in range(20000)) + "int main(void) { return 0; }\n"
        doc, _ = srv.run(code, "c", memory_mb=24)
        assert (doc["status"], doc["reason"]) == ("failed", "memory_limit"), doc
        assert srv.run("print('after')")[1]["stdout"] == "after\n"
    finally:
        srv.stop()
