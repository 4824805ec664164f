"""Peak memory of a test's subprocess, for the memory-bound tests (Linux).

`resource.getrusage(...).ru_maxrss` is no good in a process that pytest started: Linux carries
the parent's high-water mark over fork and exec, so a small process reports pytest's size.
/proc/self/status's VmHWM belongs to the process's own address space, created at exec.
SNIPPET defines peak_rss_mb() for the scripts that the tests run with `python -c`.
"""

SNIPPET = '''
def peak_rss_mb():
    """The peak resident memory of this process since it started (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
'''
