//! CPU time and memory of the machine and of processes, read from /proc
//! (for the benchmarks).

fn clock_ticks() -> f64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Busy CPU time of the whole machine so far, in nanoseconds: every state
/// of `/proc/stat`'s first line but idle and iowait (guest time is already
/// inside user).
pub fn busy_cpu_ns() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    busy_ticks(stat.lines().next().unwrap_or("")) * 1e9 / clock_ticks()
}

/// `cpu  user nice system idle iowait irq softirq steal ...` -> busy ticks.
fn busy_ticks(line: &str) -> f64 {
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// A process's CPU time so far (user + system), in nanoseconds; 0 once
/// it is gone.
pub fn process_cpu_ns(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    process_ticks(&stat) * 1e9 / clock_ticks()
}

/// `/proc/<pid>/stat` -> utime + stime (fields 14 and 15; the command name
/// in parentheses may hold spaces, so count from its closing parenthesis).
fn process_ticks(stat: &str) -> f64 {
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (the state): utime is f[11], stime f[12].
    let at = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    at(11) + at(12)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in kB; 0 if
/// unknown.
pub fn process_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  100 2 30 5000 70 4 6 1 0 0";
        assert_eq!(busy_ticks(line), 100.0 + 2.0 + 30.0 + 4.0 + 6.0 + 1.0);
    }

    #[test]
    fn process_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (tokio worker) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1000";
        assert_eq!(process_ticks(stat), 325.0);
    }

    #[test]
    fn status_fields_of_this_process() {
        let pid = std::process::id();
        assert!(process_status_kb(pid, "VmRSS") > 0);
        assert!(process_status_kb(pid, "VmHWM") >= process_status_kb(pid, "VmRSS") / 2);
        assert_eq!(process_status_kb(pid, "NoSuchField"), 0);
    }
}
