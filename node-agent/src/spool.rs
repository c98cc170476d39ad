//! The agent's node-local spool (`--state-dir`): every count it drained
//! from the kernel and has not seen committed, so that after a `kill -9` its
//! successor reports those counts once, under the same agent id and part
//! numbers (resending a part replaces it at the operator).
//!
//! Layout: `state.json` (the commit point, replaced atomically) and one
//! `parts/<n>.json` per closed part, written once. `state.json` names the
//! parts it vouches for; any other part file is a leftover of a commit that
//! did not happen and is deleted. It also names the kernel's spare tables
//! whose content it holds (they are emptied only at the next drain): a
//! successor empties those instead of counting them again.
//!
//! The exactly-once argument, for one drain (see `control.rs`): the spare
//! tables hold the previous drain's records, which the last commit holds;
//! (1) they are emptied, (2) the live tables are swapped out and read
//! without deleting, (3) the records go into windows, (4) the commit names
//! the new spare tables, (5) only then do closed windows reach the
//! reporter. A crash before (4) leaves the old commit and tables it does
//! not name (counted by the successor); after (4), tables it names.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use flowlens_api::report::{ObservationWindow, PolicyWindow};
use serde::{Deserialize, Serialize};

/// Bumped when the format changes; a spool of another version is set aside.
pub const SPOOL_VERSION: u32 = 1;

/// `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpoolState {
    pub version: u32,
    /// The agent id its parts were reported under.
    pub agent: String,
    /// Every part number below this may have been used.
    pub next_part: u64,
    /// Kernel map ids (spare tables) whose records this state holds.
    pub drained_maps: Vec<u32>,
    /// Open windows as far as drained, as a stopping agent would flush them
    /// (their part numbers are reserved: the agent never reuses them).
    pub open_windows: Vec<ObservationWindow>,
    pub open_policies: Vec<PolicyWindow>,
    /// Part numbers of the closed, uncommitted parts in `parts/`.
    pub closed: Vec<u64>,
}

/// A closed part, in `parts/<n>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SpooledPart {
    Observation(ObservationWindow),
    Policy(PolicyWindow),
}

impl SpooledPart {
    pub fn part(&self) -> u64 {
        match self {
            SpooledPart::Observation(w) => w.part,
            SpooledPart::Policy(w) => w.part,
        }
    }
}

/// What a predecessor left: every part it had not seen committed (its open
/// windows as closed-early parts), to be reported again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Restored {
    pub agent: String,
    pub next_part: u64,
    pub drained_maps: Vec<u32>,
    pub windows: Vec<ObservationWindow>,
    pub policies: Vec<PolicyWindow>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct Spool {
    dir: PathBuf,
    /// Part files written (and not deleted) by this process or found valid.
    written: BTreeSet<u64>,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and reads what a predecessor
    /// left. An unreadable state is set aside (renamed, with a warning to
    /// log by the caller in the returned message) rather than trusted.
    pub fn open(dir: &Path) -> Result<(Spool, Option<Restored>, Option<String>), SpoolError> {
        let parts = dir.join("parts");
        fs::create_dir_all(&parts).map_err(io_err(&parts))?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            written: BTreeSet::new(),
        };
        let state_path = dir.join("state.json");
        let state = match fs::read(&state_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        let mut warning = None;
        let restored = match state.map(|b| parse_state(&b, &parts)) {
            None => None,
            Some(Ok((r, files))) => {
                spool.written.extend(files);
                Some(r)
            }
            Some(Err(why)) => {
                let aside = dir.join("state.json.unreadable");
                let _ = fs::rename(&state_path, &aside);
                warning = Some(format!(
                    "{} is unreadable ({why}); set aside as {}: counts it held are lost",
                    state_path.display(),
                    aside.display()
                ));
                None
            }
        };
        // Part files no state vouches for: a commit that did not happen.
        for e in fs::read_dir(&parts).map_err(io_err(&parts))?.flatten() {
            let n = part_number(&e.path());
            if n.is_none_or(|n| !spool.written.contains(&n)) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok((spool, restored, warning))
    }

    /// Makes `state` the spool's content: writes the part files of `new`
    /// (each once), then `state.json` (the commit point), then deletes the
    /// part files `state` no longer names.
    pub fn commit(&mut self, state: &SpoolState, new: &[SpooledPart]) -> Result<(), SpoolError> {
        let parts = self.dir.join("parts");
        for p in new {
            if self.written.contains(&p.part()) {
                continue;
            }
            let path = parts.join(format!("{}.json", p.part()));
            write_synced(&path, &serde_json::to_vec(p).expect("a part serializes"))?;
            self.written.insert(p.part());
        }
        if !new.is_empty() {
            sync_dir(&parts)?;
        }
        let state_path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        write_synced(
            &tmp,
            &serde_json::to_vec(state).expect("the state serializes"),
        )?;
        fs::rename(&tmp, &state_path).map_err(io_err(&state_path))?;
        sync_dir(&self.dir)?;
        let keep: BTreeSet<u64> = state.closed.iter().copied().collect();
        let gone: Vec<u64> = self.written.difference(&keep).copied().collect();
        for n in gone {
            let _ = fs::remove_file(parts.join(format!("{n}.json")));
            self.written.remove(&n);
        }
        Ok(())
    }
}

impl Spool {
    /// Makes a predecessor's parts this agent's: every part gets a file
    /// (its open windows had none) and the state names them all, with the
    /// spare tables the predecessor named (still holding those records).
    pub fn adopt(&mut self, r: &Restored) -> Result<(), SpoolError> {
        let parts: Vec<SpooledPart> = r
            .windows
            .iter()
            .cloned()
            .map(SpooledPart::Observation)
            .chain(r.policies.iter().cloned().map(SpooledPart::Policy))
            .collect();
        let state = SpoolState {
            version: SPOOL_VERSION,
            agent: r.agent.clone(),
            next_part: r.next_part,
            drained_maps: r.drained_maps.clone(),
            open_windows: Vec::new(),
            open_policies: Vec::new(),
            closed: parts.iter().map(SpooledPart::part).collect(),
        };
        self.commit(&state, &parts)
    }

    /// Removes the state (after a failed commit: a stale one would make a
    /// successor count again what was reported since).
    pub fn abandon(&mut self) -> io::Result<()> {
        match fs::remove_file(self.dir.join("state.json")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn part_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// The state and the parts it names (and their numbers); any error makes
/// the whole unreadable (a partial restore could count a part's drained
/// tables twice).
fn parse_state(bytes: &[u8], parts: &Path) -> Result<(Restored, Vec<u64>), String> {
    let state: SpoolState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if state.version != SPOOL_VERSION {
        return Err(format!(
            "version {} (this agent writes {SPOOL_VERSION})",
            state.version
        ));
    }
    let mut r = Restored {
        agent: state.agent,
        next_part: state.next_part,
        drained_maps: state.drained_maps,
        windows: state.open_windows,
        policies: state.open_policies,
    };
    for n in &state.closed {
        let path = parts.join(format!("{n}.json"));
        let b = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        match serde_json::from_slice::<SpooledPart>(&b)
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            SpooledPart::Observation(w) => r.windows.push(w),
            SpooledPart::Policy(p) => r.policies.push(p),
        }
    }
    Ok((r, state.closed))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowlens-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn obs(part: u64) -> ObservationWindow {
        ObservationWindow {
            uid: "u".into(),
            start: 100,
            window_seconds: 10,
            part,
            ..Default::default()
        }
    }

    fn pol(part: u64) -> PolicyWindow {
        PolicyWindow {
            start: 100,
            window_seconds: 10,
            part,
            policies: vec![],
        }
    }

    #[test]
    fn a_commit_is_what_a_successor_restores() {
        let d = dir("commit");
        let (mut s, r, w) = Spool::open(&d).unwrap();
        assert_eq!((r, w), (None, None));
        let state = SpoolState {
            version: SPOOL_VERSION,
            agent: "a-1".into(),
            next_part: 9,
            drained_maps: vec![4, 5],
            open_windows: vec![obs(8)],
            open_policies: vec![],
            closed: vec![1, 2],
        };
        let new = [
            SpooledPart::Observation(obs(1)),
            SpooledPart::Policy(pol(2)),
            SpooledPart::Observation(obs(3)),
        ];
        s.commit(&state, &new).unwrap();
        // Part 3 is not named by the state: not kept.
        assert!(!d.join("parts/3.json").exists());
        let (_, r, w) = Spool::open(&d).unwrap();
        assert_eq!(w, None);
        let r = r.unwrap();
        assert_eq!(r.agent, "a-1");
        assert_eq!(r.next_part, 9);
        assert_eq!(r.drained_maps, vec![4, 5]);
        let parts: Vec<u64> = r.windows.iter().map(|w| w.part).collect();
        assert_eq!(parts, vec![8, 1]);
        assert_eq!(r.policies, vec![pol(2)]);

        // Committed parts leave the spool.
        let (mut s, _, _) = Spool::open(&d).unwrap();
        s.commit(
            &SpoolState {
                closed: vec![2],
                open_windows: vec![],
                ..state
            },
            &[],
        )
        .unwrap();
        assert!(!d.join("parts/1.json").exists());
        let r = Spool::open(&d).unwrap().1.unwrap();
        assert!(r.windows.is_empty());
        assert_eq!(r.policies.len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_adopted_spool_keeps_the_open_windows_as_files() {
        let d = dir("adopt");
        let (mut s, _, _) = Spool::open(&d).unwrap();
        let state = SpoolState {
            version: SPOOL_VERSION,
            agent: "a".into(),
            next_part: 5,
            drained_maps: vec![9],
            open_windows: vec![obs(4)],
            open_policies: vec![pol(5)],
            closed: vec![1],
        };
        s.commit(&state, &[SpooledPart::Observation(obs(1))])
            .unwrap();
        let (mut s, r, _) = Spool::open(&d).unwrap();
        let r = r.unwrap();
        s.adopt(&r).unwrap();
        let again = Spool::open(&d).unwrap().1.unwrap();
        let mut parts: Vec<u64> = again.windows.iter().map(|w| w.part).collect();
        parts.extend(again.policies.iter().map(|p| p.part));
        parts.sort();
        assert_eq!(parts, vec![1, 4, 5]);
        assert_eq!((again.next_part, again.drained_maps), (5, vec![9]));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_uncommitted_part_file_is_ignored_and_removed() {
        let d = dir("uncommitted");
        let (mut s, _, _) = Spool::open(&d).unwrap();
        s.commit(
            &SpoolState {
                version: SPOOL_VERSION,
                agent: "a".into(),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        // A crash between writing a part and the state naming it.
        fs::write(
            d.join("parts/7.json"),
            serde_json::to_vec(&SpooledPart::Observation(obs(7))).unwrap(),
        )
        .unwrap();
        let (_, r, _) = Spool::open(&d).unwrap();
        assert!(r.unwrap().windows.is_empty());
        assert!(!d.join("parts/7.json").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unreadable_state_is_set_aside_not_trusted() {
        let d = dir("unreadable");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("state.json"), b"{\"version\": 1, \"agent\": ").unwrap();
        let (_, r, w) = Spool::open(&d).unwrap();
        assert_eq!(r, None);
        assert!(w.unwrap().contains("unreadable"));
        assert!(d.join("state.json.unreadable").exists());
        // A state naming a part that is missing is unreadable too.
        let state = SpoolState {
            version: SPOOL_VERSION,
            closed: vec![3],
            ..Default::default()
        };
        fs::write(d.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
        let (_, r, w) = Spool::open(&d).unwrap();
        assert_eq!(r, None);
        assert!(w.unwrap().contains("3.json"));
        fs::remove_dir_all(&d).unwrap();
    }
}
