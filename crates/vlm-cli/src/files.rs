//! Finding the images to narrate.

use std::path::{Path, PathBuf};

use crate::shard::Shard;

/// The extensions a folder walk picks up, matched case-insensitively.
pub const EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "gif"];

/// TIFFs: walked and converted to JPEG (or PNG) before sending where the `resize` feature can
/// (on by default); otherwise passed over and counted.
pub const CONVERTED: [&str; 2] = ["tif", "tiff"];

/// Whether this build converts TIFFs.
const CONVERTS_TIFF: bool = cfg!(feature = "resize");

/// Photograph types a folder walk finds but does not send (no server takes them): counted in
/// the summary, never silently skipped. Sidecars and other files (`.xmp`, `.txt`) are not
/// photographs and are not counted. TIFFs too when they cannot be converted.
pub const PASSED_OVER: [&str; 15] = [
    "heic", "heif", "avif", "jxl", "bmp", "psd", "dng", "cr2", "cr3", "nef", "arw", "raf", "orf",
    "rw2", "pef",
];

fn passed_over(ext: &str) -> bool {
    PASSED_OVER.contains(&ext) || (!CONVERTS_TIFF && CONVERTED.contains(&ext))
}

/// The summary's words for what a walk passed over: `3 skipped: 1 .cr2, 1 .heic, 1 .tif`.
pub fn passed_over_summary(
    passed_over: &std::collections::BTreeMap<String, usize>,
) -> Option<String> {
    let total: usize = passed_over.values().sum();
    if total == 0 {
        return None;
    }
    let each: Vec<String> = passed_over
        .iter()
        .map(|(ext, n)| format!("{n} .{ext}"))
        .collect();
    Some(format!(
        "{total} photograph(s) of types no server takes skipped: {} — not sent; convert them to \
         JPEG or PNG (see docs/cli.md, Image types)",
        each.join(", ")
    ))
}

/// One image to narrate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Input {
    /// As discovered: the argument joined with the walked entry, not canonicalised.
    pub path: PathBuf,
}

impl Input {
    /// The path as the record shows it (lossy for a path that is not UTF-8).
    pub fn shown(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

/// Every image of a run, in order. A library of 100,000 images keeps 100,000 paths for the
/// whole run, so they are packed into one buffer (no allocation per path) and an [`Input`] is
/// made only when its image is started.
#[derive(Debug, Default)]
pub struct Inputs {
    #[cfg(unix)]
    bytes: Vec<u8>,
    #[cfg(unix)]
    ends: Vec<usize>,
    #[cfg(not(unix))]
    paths: Vec<PathBuf>,
    /// Images found that belong to other shards (`--shard`).
    pub other_shards: usize,
    /// Photographs of types no server takes, found in the folders walked and passed over, by
    /// lower-case extension (`tif` → 3).
    pub passed_over: std::collections::BTreeMap<String, usize>,
}

impl Inputs {
    fn push(&mut self, path: &Path) {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt as _;
            self.bytes.extend_from_slice(path.as_os_str().as_bytes());
            self.ends.push(self.bytes.len());
        }
        #[cfg(not(unix))]
        self.paths.push(path.to_path_buf());
    }

    /// How many images.
    pub fn len(&self) -> usize {
        #[cfg(unix)]
        return self.ends.len();
        #[cfg(not(unix))]
        return self.paths.len();
    }

    /// The `i`-th path.
    fn get(&self, i: usize) -> PathBuf {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt as _;
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            PathBuf::from(std::ffi::OsStr::from_bytes(
                &self.bytes[start..self.ends[i]],
            ))
        }
        #[cfg(not(unix))]
        self.paths[i].clone()
    }

    fn shrink_to_fit(&mut self) {
        #[cfg(unix)]
        {
            self.bytes.shrink_to_fit();
            self.ends.shrink_to_fit();
        }
        #[cfg(not(unix))]
        self.paths.shrink_to_fit();
    }
}

impl IntoIterator for Inputs {
    type Item = Input;
    type IntoIter = Box<dyn Iterator<Item = Input> + Send>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new((0..self.len()).map(move |i| Input { path: self.get(i) }))
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e))
            || (CONVERTS_TIFF && CONVERTED.iter().any(|x| x.eq_ignore_ascii_case(e)))
    })
}

/// The files already listed, by identity (device and inode), so that one file named several
/// ways (`img`, `img/`, `./img/a.png`, an absolute path, a link) is narrated once.
#[derive(Default)]
struct Seen {
    #[cfg(unix)]
    files: std::collections::HashSet<(u64, u64)>,
    duplicates: usize,
    shard: Option<Shard>,
}

impl Seen {
    /// Adds `path` unless its file is already listed. A path that cannot be looked at (missing,
    /// a dangling link) is always added: it becomes an error record.
    fn add(&mut self, path: &Path, relative: &Path, found: &mut Inputs) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            if let Ok(meta) = std::fs::metadata(path)
                && !self.files.insert((meta.dev(), meta.ino()))
            {
                self.duplicates += 1;
                return;
            }
        }
        if self.shard.is_some_and(|s| !s.takes(relative)) {
            found.other_shards += 1;
            return;
        }
        found.push(path);
    }
}

/// Expands the arguments: folders are walked recursively in sorted order, picking files by
/// extension; a file named explicitly is always attempted, whatever its name, and so is a path
/// that does not exist (it becomes an error record, never a silent skip). Each file is listed
/// once, under the first name found. Returns the inputs and warnings.
///
/// With `shard`, only the images of that shard are listed (after duplicates are dropped, so a
/// file named two ways is still narrated once in all): each is hashed by its path relative to
/// the argument it was found under (a file given by name: its file name), the same on every
/// machine. [`Inputs::other_shards`] counts the rest.
pub fn discover(args: &[PathBuf], shard: Option<Shard>) -> (Inputs, Vec<String>) {
    let mut inputs = Inputs::default();
    let mut warnings = Vec::new();
    let mut seen = Seen {
        shard,
        ..Seen::default()
    };
    for arg in args {
        if arg.is_dir() {
            let before = inputs.len() + seen.duplicates + inputs.other_shards;
            walk(arg, arg, &mut inputs, &mut seen, &mut warnings);
            if inputs.len() + seen.duplicates + inputs.other_shards == before {
                warnings.push(format!(
                    "{}: no .jpg, .jpeg, .png, .webp or .gif files in this folder",
                    arg.display()
                ));
            }
        } else {
            let name = arg.file_name().map_or_else(|| arg.clone(), PathBuf::from);
            seen.add(arg, &name, &mut inputs);
        }
    }
    if seen.duplicates > 0 {
        warnings.push(format!(
            "{} path(s) name a file already listed under another name; each file is narrated \
             once, under the first name found",
            seen.duplicates
        ));
    }
    // The list lives for the whole run: give back the growth slack.
    inputs.shrink_to_fit();
    (inputs, warnings)
}

/// Depth first, each folder's entries sorted by name: the same order as sorting the full paths
/// component by component, without ever holding more than one folder's listing.
fn walk(root: &Path, dir: &Path, found: &mut Inputs, seen: &mut Seen, warnings: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warnings.push(format!("{}: cannot list this folder: {e}", dir.display()));
            return;
        }
    };
    let mut entries: Vec<(std::ffi::OsString, std::fs::FileType)> = entries
        .flatten()
        .filter_map(|entry| Some((entry.file_name(), entry.file_type().ok()?)))
        .collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (name, kind) in entries {
        let path = dir.join(&name);
        // Symlinked folders are not followed (no loops). Any other entry with an image extension
        // is attempted, a dangling link included: it becomes an error record, not a silent skip.
        if kind.is_dir() {
            walk(root, &path, found, seen, warnings);
        } else if has_image_extension(&path) && !(kind.is_symlink() && path.is_dir()) {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            seen.add(&path, relative, found);
        } else if let Some(ext) = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .filter(|e| passed_over(e))
        {
            *found.passed_over.entry(ext).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_sorted_case_insensitively_and_keeps_explicit_files() {
        let dir = std::env::temp_dir().join(format!("vlm-cli-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in [
            "b.PNG",
            "a.jpg",
            "notes.txt",
            "raw.CR2",
            "scan.tif",
            "sub/phone.HEIC",
            "sub/scan2.TIFF",
            "a.xmp",
            "sub/c.WebP",
            "sub/d.gif",
            "e.JPEG",
            "sub.jpg",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let (inputs, warnings) = discover(
            &[dir.clone(), dir.join("notes.txt"), dir.join("missing.jpg")],
            None,
        );
        let summary = passed_over_summary(&inputs.passed_over).unwrap();
        if CONVERTS_TIFF {
            assert_eq!(
                summary,
                "2 photograph(s) of types no server takes skipped: 1 .cr2, 1 .heic — not sent; \
                 convert them to JPEG or PNG (see docs/cli.md, Image types)"
            );
        } else {
            assert!(summary.starts_with("4 photograph(s)"), "{summary}");
        }
        let names: Vec<String> = inputs
            .into_iter()
            .map(|i| {
                i.shown()
                    .trim_start_matches(&dir.to_string_lossy().into_owned())
                    .to_owned()
            })
            .collect();
        // TIFFs are walked where they can be converted, in their place in the order.
        let tiffs: Vec<&String> = names.iter().filter(|n| n.contains("scan")).collect();
        let expected_tiffs: &[&str] = if CONVERTS_TIFF {
            &["/scan.tif", "/sub/scan2.TIFF"]
        } else {
            &[]
        };
        assert_eq!(tiffs, expected_tiffs);
        let names: Vec<&String> = names.iter().filter(|n| !n.contains("scan")).collect();
        assert_eq!(
            names,
            [
                "/a.jpg",
                "/b.PNG",
                "/e.JPEG",
                "/sub/c.WebP",
                "/sub/d.gif",
                "/sub.jpg",
                "/notes.txt",
                "/missing.jpg"
            ]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn one_file_named_several_ways_is_listed_once_under_its_first_name() {
        let dir = std::env::temp_dir().join(format!("vlm-cli-dups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("img")).unwrap();
        std::fs::write(dir.join("img/a.png"), b"x").unwrap();
        std::fs::write(dir.join("img/b.png"), b"y").unwrap();
        std::os::unix::fs::symlink(dir.join("img/a.png"), dir.join("img/link.png")).unwrap();
        let img = dir.join("img");
        let args = [
            img.clone(),
            PathBuf::from(format!("{}/", img.display())),
            img.join("./a.png"),
            img.join("a.png").canonicalize().unwrap(),
            dir.join("missing.png"),
            dir.join("missing.png"),
        ];
        let (inputs, warnings) = discover(&args, None);
        let names: Vec<String> = inputs.into_iter().map(|i| i.shown()).collect();
        assert_eq!(
            names,
            [
                img.join("a.png").display().to_string(),
                img.join("b.png").display().to_string(),
                // Missing paths have no identity: each is an error record.
                dir.join("missing.png").display().to_string(),
                dir.join("missing.png").display().to_string(),
            ]
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("6 path(s) name a file already listed")),
            "{warnings:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
