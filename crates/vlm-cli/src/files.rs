//! Finding the images to narrate.

use std::path::{Path, PathBuf};

/// The extensions a folder walk picks up, matched case-insensitively.
pub const EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "gif"];

/// One image to narrate. Only the path is kept (a library of 100,000 images holds 100,000 of
/// these for the whole run); the record's text form is derived when needed.
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

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Expands the arguments: folders are walked recursively (sorted, by extension); a file named
/// explicitly is always attempted, whatever its name, and so is a path that does not exist (it
/// becomes an error record, never a silent skip). Returns the inputs and warnings.
pub fn discover(args: &[PathBuf]) -> (Vec<Input>, Vec<String>) {
    let mut inputs = Vec::new();
    let mut warnings = Vec::new();
    for arg in args {
        if arg.is_dir() {
            // Walked straight into `inputs` and sorted in place: no second list of paths.
            let start = inputs.len();
            walk(arg, &mut inputs, &mut warnings);
            inputs[start..].sort_unstable();
            if inputs.len() == start {
                warnings.push(format!(
                    "{}: no .jpg, .jpeg, .png, .webp or .gif files in this folder",
                    arg.display()
                ));
            }
        } else {
            inputs.push(Input { path: arg.clone() });
        }
    }
    (inputs, warnings)
}

fn walk(dir: &Path, found: &mut Vec<Input>, warnings: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warnings.push(format!("{}: cannot list this folder: {e}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        // Symlinked folders are not followed (no loops). Any other entry with an image extension
        // is attempted, a dangling link included: it becomes an error record, not a silent skip.
        if kind.is_dir() {
            walk(&path, found, warnings);
        } else if has_image_extension(&path) && !(kind.is_symlink() && path.is_dir()) {
            found.push(Input { path });
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
            "sub/c.WebP",
            "sub/d.gif",
            "e.JPEG",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let (inputs, warnings) =
            discover(&[dir.clone(), dir.join("notes.txt"), dir.join("missing.jpg")]);
        let names: Vec<String> = inputs
            .iter()
            .map(|i| {
                i.shown()
                    .trim_start_matches(&dir.to_string_lossy().into_owned())
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "/a.jpg",
                "/b.PNG",
                "/e.JPEG",
                "/sub/c.WebP",
                "/sub/d.gif",
                "/notes.txt",
                "/missing.jpg"
            ]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
