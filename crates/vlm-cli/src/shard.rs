//! `--shard I/N`: this process narrates only the images whose stable hash falls in shard I of N,
//! so a cluster scheduler's array of jobs covers a folder exactly once between them.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::Failure;

/// One shard of N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, 0-based.
    pub index: u64,
    /// How many shards there are.
    pub count: u64,
}

/// Where `--shard auto` looked, for messages: Kubernetes Indexed Jobs, then Slurm job arrays.
pub const AUTO_SOURCES: &str = "Kubernetes Indexed Jobs (JOB_COMPLETION_INDEX, with the count in \
VLM_SHARD_COUNT) or Slurm job arrays (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, \
SLURM_ARRAY_TASK_COUNT)";

impl Shard {
    /// Parses `I/N` (0 <= I < N) or `auto` (read from `env`, the process environment in `vlm`).
    pub fn parse(value: &str, env: impl Fn(&str) -> Option<String>) -> Result<Shard, Failure> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("auto") {
            return Shard::from_scheduler(env);
        }
        let bad = || {
            Failure::usage(format!(
                "invalid --shard {value:?}: expected I/N with 0 <= I < N (e.g. 0/4), or auto"
            ))
        };
        let (i, n) = value.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// `--shard auto`: a Kubernetes Indexed Job or a Slurm array task.
    fn from_scheduler(env: impl Fn(&str) -> Option<String>) -> Result<Shard, Failure> {
        let number = |name: &str| -> Result<Option<u64>, Failure> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Failure::usage(format!(
                        "--shard auto: {name}={v:?} is not a whole number >= 0"
                    ))
                }),
            }
        };
        let missing = |name: &str, why: &str| {
            Failure::usage(format!("--shard auto: {name} is not set; {why}"))
        };
        let shard = if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = number("VLM_SHARD_COUNT")?.ok_or_else(|| {
                missing(
                    "VLM_SHARD_COUNT",
                    "in a Kubernetes Indexed Job, set it to spec.completions in the pod's env \
                     (see docs/scaling.md)",
                )
            })?;
            (index, count, "JOB_COMPLETION_INDEX of VLM_SHARD_COUNT")
        } else if let Some(task) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.ok_or_else(|| {
                missing(
                    "SLURM_ARRAY_TASK_MIN",
                    "run under sbatch --array (see docs/scaling.md)",
                )
            })?;
            let count = number("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                missing(
                    "SLURM_ARRAY_TASK_COUNT",
                    "run under sbatch --array (see docs/scaling.md)",
                )
            })?;
            let index = task.checked_sub(min).ok_or_else(|| {
                Failure::usage(format!(
                    "--shard auto: SLURM_ARRAY_TASK_ID {task} is below SLURM_ARRAY_TASK_MIN {min}"
                ))
            })?;
            (
                index,
                count,
                "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT",
            )
        } else {
            return Err(Failure::usage(format!(
                "--shard auto: no shard index found (JOB_COMPLETION_INDEX nor SLURM_ARRAY_TASK_ID is \
                 set); it reads {AUTO_SOURCES}. Outside a scheduler, give --shard I/N"
            )));
        };
        let (index, count, from) = shard;
        if count == 0 || index >= count {
            return Err(Failure::usage(format!(
                "--shard auto: shard {index} of {count} from {from} is out of range (a stepped \
                 Slurm array such as --array=0-9:2 is not contiguous; use --array=0-N)"
            )));
        }
        tracing::info!("--shard auto: shard {index} of {count} (from {from})");
        Ok(Shard { index, count })
    }

    /// `--shard`'s value, when given: parsed, with `auto` read from the process environment.
    pub fn from_flag(value: Option<&str>) -> Result<Option<Shard>, Failure> {
        value
            .map(|s| Shard::parse(s, |name| std::env::var(name).ok()))
            .transpose()
    }

    /// Whether the item named `key` (a `vlm run` request's `custom_id`) is this shard's: the
    /// first 8 bytes of the key's SHA-256, modulo N.
    pub fn takes_key(&self, key: &str) -> bool {
        let digest = Sha256::digest(key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first) % self.count == self.index
    }

    /// Whether the image at `relative` (its path relative to the argument it was found under,
    /// `/`-separated) is this shard's: the first 8 bytes of its SHA-256, modulo N.
    pub fn takes(&self, relative: &Path) -> bool {
        // `./a.jpg`, `a.jpg` and `sub//a.jpg`'s spellings aside, the same key everywhere.
        let key: Vec<String> = relative
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        self.takes_key(&key.join("/"))
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn shards_split_paths_exactly_once_and_stably() {
        let paths: Vec<String> = (0..1000)
            .map(|i| format!("day{}/img_{i}.jpg", i % 7))
            .collect();
        let shards: Vec<Shard> = (0..4).map(|i| Shard { index: i, count: 4 }).collect();
        let mut sizes = [0usize; 4];
        for p in &paths {
            let owners: Vec<u64> = shards
                .iter()
                .filter(|s| s.takes(Path::new(p)))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1, "{p}");
            sizes[owners[0] as usize] += 1;
        }
        assert!(sizes.iter().all(|n| (200..300).contains(n)), "{sizes:?}");
        // Fixed values: the same on every machine, run and spelling of the path.
        let s = Shard { index: 0, count: 2 };
        let taken = ["a.jpg", "./b.jpg", "sub//c.jpg", "d.png", "e.jpg", "f.jpg"]
            .map(|p| s.takes(Path::new(p)));
        // Computed independently: int.from_bytes(hashlib.sha256(b"sub/c.jpg").digest()[:8],
        // "big") % 2 == 0, and so on, in Python.
        assert_eq!(taken, [true, true, true, true, false, false]);
    }

    #[test]
    fn auto_reads_kubernetes_then_slurm_and_names_what_is_missing() {
        let k8s = Shard::parse(
            "auto",
            env(&[("JOB_COMPLETION_INDEX", "2"), ("VLM_SHARD_COUNT", "5")]),
        );
        assert_eq!(k8s.unwrap(), Shard { index: 2, count: 5 });
        let slurm = Shard::parse(
            "auto",
            env(&[
                ("SLURM_ARRAY_TASK_ID", "11"),
                ("SLURM_ARRAY_TASK_MIN", "10"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ]),
        );
        assert_eq!(slurm.unwrap(), Shard { index: 1, count: 4 });
        for (vars, named) in [
            (&[("JOB_COMPLETION_INDEX", "2")][..], "VLM_SHARD_COUNT"),
            (
                &[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "0")],
                "SLURM_ARRAY_TASK_COUNT",
            ),
            (&[("SLURM_ARRAY_TASK_ID", "3")], "SLURM_ARRAY_TASK_MIN"),
            (&[], "JOB_COMPLETION_INDEX"),
            (
                &[("JOB_COMPLETION_INDEX", "x"), ("VLM_SHARD_COUNT", "2")],
                "JOB_COMPLETION_INDEX",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "4"), ("VLM_SHARD_COUNT", "4")],
                "out of range",
            ),
        ] {
            let e = Shard::parse("auto", env(vars)).unwrap_err();
            assert_eq!(e.exit, crate::Exit::Usage);
            assert!(e.message.contains(named), "{vars:?}: {}", e.message);
        }
        for bad in ["1/1", "3", "a/b", "-1/2", "0/0"] {
            assert!(Shard::parse(bad, env(&[])).is_err(), "{bad}");
        }
        assert_eq!(
            Shard::parse(" 1/3 ", env(&[])).unwrap(),
            Shard { index: 1, count: 3 }
        );
    }
}
