//! What the generator reads from the OS: the wall clock that timestamps messages, CPU time
//! and RSS of the server (from /proc) and of itself (getrusage), and a precise timer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub mod clock {
    use std::time::{SystemTime, UNIX_EPOCH};

    /// CLOCK_REALTIME in nanoseconds since the Unix epoch: the shared epoch of the `t` field,
    /// so a publisher in another process (or on another synchronized host) can stamp too.
    pub fn realtime_ns() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }
}

/// CPU time and memory of one process, from /proc/PID/stat and /proc/PID/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_seconds: f64,
    pub rss_kb: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Reads one process; `None` if it does not exist (any more).
pub fn sample_pid(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample { cpu_seconds: (utime + stime) as f64 / clock_ticks(), rss_kb })
}

/// Sums several processes (herald instances, or herald and Redis); missing ones count 0.
pub fn sample_pids(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    let mut total = ProcSample::default();
    for pid in pids {
        let s = sample_pid(*pid).unwrap_or_default();
        total.cpu_seconds += s.cpu_seconds;
        total.rss_kb += s.rss_kb;
    }
    Some(total)
}

/// CPU seconds of each thread of this process by thread name (summed per name), from
/// /proc/self/task/*/stat: shows whether the publisher or a worker is the busy one.
pub fn sample_threads() -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_ascii_whitespace().collect();
        let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
        let cpu = ticks as f64 / clock_ticks();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += cpu,
            None => out.push((name, cpu)),
        }
    }
    out
}

/// This process: CPU of all its threads (getrusage, microsecond resolution) and RSS.
pub fn sample_self() -> ProcSample {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0;
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu_seconds = if ok { tv(usage.ru_utime) + tv(usage.ru_stime) } else { 0.0 };
    let rss_kb = sample_pid(std::process::id()).map_or(0, |s| s.rss_kb);
    ProcSample { cpu_seconds, rss_kb }
}

/// A CLOCK_REALTIME timerfd armed at absolute times: wakes a mio loop with nanosecond
/// precision where epoll's own timeout has millisecond granularity.
pub struct TimerFd(OwnedFd);

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned fd is owned by us from here on.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once at `at_ns` (CLOCK_REALTIME nanoseconds); a time in the past fires at once.
    pub fn arm_at(&self, at_ns: u64) -> io::Result<()> {
        let at_ns = at_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid fd and pointer to an initialized itimerspec.
        let rc =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A minimal epoll set for the publisher, which also waits on a timerfd (mio without its
/// `os-ext` feature cannot register a raw descriptor).
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the returned fd is owned by us from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` edge-triggered for input (when `read`) and output (when `write`).
    pub fn add(&self, fd: RawFd, token: u64, read: bool, write: bool) -> io::Result<()> {
        let mut flags = libc::EPOLLET;
        if read {
            flags |= libc::EPOLLIN | libc::EPOLLRDHUP;
        }
        if write {
            flags |= libc::EPOLLOUT;
        }
        let mut event = libc::epoll_event { events: flags as u32, u64: token };
        // SAFETY: valid epoll fd, valid event pointer.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(&self, fd: RawFd) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll fd; a stale fd only yields an error we ignore.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event) };
    }

    /// Waits up to `timeout_ms` and appends the tokens of ready descriptors to `ready`.
    pub fn wait(&self, ready: &mut Vec<u64>, timeout_ms: i32) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: the buffer holds 64 events, as we say.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 64, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        ready.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// Lets the calling thread's sleeps end within a microsecond of their deadline.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument (nanoseconds) for this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

/// The soft limit on open files (informational: the hard limit cannot be raised here).
pub fn open_file_limit() -> u64 {
    // SAFETY: getrlimit writes into the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 0 }
}

/// Raises the soft open-file limit to the hard limit.
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_sample_reads_proc() {
        let s = sample_pid(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kb > 0);
        assert!(sample_self().cpu_seconds >= 0.0);
        assert!(sample_pid(u32::MAX).is_none());
    }
}
