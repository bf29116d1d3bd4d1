//! Paths as the operating system names them, across processes and in state files. A file name need
//! not be UTF-8 (a Latin-1 name from an old crawl mirror): such a file is still read, by its exact
//! name, and recorded by it; only what users read (drops, origins) shows it lossily.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// The bytes of a path (on Unix exactly the OS name; elsewhere its UTF-8, lossily).
pub fn to_bytes(path: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        path.to_string_lossy().into_owned().into_bytes()
    }
}

/// The path with these bytes (the inverse of [`to_bytes`]).
pub fn from_bytes(bytes: Vec<u8>) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(bytes))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// `#[serde(with = "os_path")]` for records that cross processes (bincode): the path as bytes.
pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(&to_bytes(path))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Ok(from_bytes(serde_bytes_vec(d)?))
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a path as bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_byte_buf(V)
}

/// A path in a JSON state file: a string when it is UTF-8 (readable), else its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PathText {
    /// A UTF-8 path.
    Text(String),
    /// Any other path, as its bytes.
    Bytes(Vec<u8>),
}

impl From<&Path> for PathText {
    fn from(p: &Path) -> Self {
        match p.to_str() {
            Some(s) => PathText::Text(s.to_owned()),
            None => PathText::Bytes(to_bytes(p)),
        }
    }
}

impl From<PathText> for PathBuf {
    fn from(p: PathText) -> Self {
        match p {
            PathText::Text(s) => PathBuf::from(s),
            PathText::Bytes(b) => from_bytes(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn latin1() -> PathBuf {
        from_bytes(b"/in/caf\xe9.warc".to_vec())
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_paths_survive_bincode_and_json() {
        #[derive(Serialize, Deserialize)]
        struct Item {
            #[serde(with = "super")]
            path: PathBuf,
        }
        let p = latin1();
        assert!(p.to_str().is_none());
        let bytes = bincode::serialize(&Item { path: p.clone() }).unwrap();
        assert_eq!(bincode::deserialize::<Item>(&bytes).unwrap().path, p);
        let json = serde_json::to_string(&PathText::from(p.as_path())).unwrap();
        let back: PathText = serde_json::from_str(&json).unwrap();
        assert_eq!(PathBuf::from(back), p);
        // A UTF-8 path stays a readable string.
        let json = serde_json::to_string(&PathText::from(Path::new("/in/café.warc"))).unwrap();
        assert_eq!(json, "\"/in/café.warc\"");
    }
}
