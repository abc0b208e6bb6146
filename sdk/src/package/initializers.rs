//! Where a graph's weights are: a minimal reader of the ONNX protobuf that lists the graph's
//! initializers (name, dims, element type) and where each one's bytes lie, in the `.onnx` file
//! itself (`raw_data`) or in its external data file (`location`, `offset`, `length`). Nothing
//! else of the graph is decoded and no weight is read: the file is walked with seeks, so a
//! graph of any size costs a few reads. LoRA merging reads the tensors it changes from here.
//!
//! Only the protobuf wire format is needed (varints and length-delimited fields); the field
//! numbers are those of `onnx.proto` (ModelProto.graph = 7, GraphProto.initializer = 5,
//! TensorProto: dims 1, data_type 2, name 8, raw_data 9, external_data 13, data_location 14).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// ONNX element types of weights LoRA can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    Float32,
    Float16,
    BFloat16,
}

impl ElementType {
    fn from_onnx(code: i64) -> Option<ElementType> {
        match code {
            1 => Some(ElementType::Float32),
            10 => Some(ElementType::Float16),
            16 => Some(ElementType::BFloat16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            ElementType::Float32 => 4,
            ElementType::Float16 | ElementType::BFloat16 => 2,
        }
    }

    /// The manifest's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            ElementType::Float32 => "float32",
            ElementType::Float16 => "float16",
            ElementType::BFloat16 => "bfloat16",
        }
    }
}

/// One initializer of a graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Initializer {
    pub dims: Vec<usize>,
    /// `None` for element types other than the float ones LoRA handles.
    pub element_type: Option<ElementType>,
    /// The file that holds the bytes and where; `None` when the tensor is stored in typed
    /// fields (`float_data`) instead of raw bytes, which the exporter never writes for weights.
    pub bytes: Option<(PathBuf, u64, u64)>,
}

impl Initializer {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Reads the tensor's bytes.
    pub fn read_bytes(&self) -> Result<Vec<u8>, String> {
        let (path, offset, length) = self.bytes.as_ref().ok_or("the tensor is not stored as raw bytes")?;
        let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Checked before allocating: the length is the graph's word, not the file's.
        let file_len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
        if offset.checked_add(*length).is_none_or(|end| end > file_len) {
            return Err(format!(
                "{}: {length} bytes at offset {offset} run past the end of the file ({file_len} bytes)",
                path.display()
            ));
        }
        file.seek(SeekFrom::Start(*offset)).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut data = vec![0u8; *length as usize];
        file.read_exact(&mut data).map_err(|e| format!("{}: {e} (at offset {offset})", path.display()))?;
        Ok(data)
    }
}

/// The initializers of the graph in `path`, by name.
pub fn read_initializers(path: &Path) -> Result<BTreeMap<String, Initializer>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
    let mut reader = Reader { inner: BufReader::with_capacity(1 << 16, file), pos: 0 };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut found = BTreeMap::new();
    let malformed = |e: String| format!("{}: not a readable ONNX model: {e}", path.display());
    while reader.pos < len {
        let (field, wire) = reader.key().map_err(malformed)?;
        if field == 7 && wire == LEN {
            let size = reader.varint().map_err(malformed)?;
            let end = reader.pos + size;
            read_graph(&mut reader, end, path, dir, &mut found).map_err(malformed)?;
        } else {
            reader.skip(wire).map_err(malformed)?;
        }
    }
    if reader.pos != len {
        return Err(malformed("a field runs past the end of the file".into()));
    }
    Ok(found)
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

struct Reader {
    inner: BufReader<File>,
    pos: u64,
}

impl Reader {
    fn byte(&mut self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.inner.read_exact(&mut b).map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint too long at byte {}", self.pos))
    }

    fn key(&mut self) -> Result<(u64, u8), String> {
        let key = self.varint()?;
        Ok((key >> 3, (key & 7) as u8))
    }

    fn advance(&mut self, n: u64) -> Result<(), String> {
        let n = i64::try_from(n).map_err(|_| "length out of range".to_string())?;
        self.inner.seek_relative(n).map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += n as u64;
        Ok(())
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            VARINT => self.varint().map(|_| ()),
            I64 => self.advance(8),
            LEN => {
                let n = self.varint()?;
                self.advance(n)
            }
            I32 => self.advance(4),
            other => Err(format!("unsupported wire type {other} at byte {}", self.pos)),
        }
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.varint()?;
        if n > 1 << 20 {
            return Err(format!("a name of {n} bytes at byte {}", self.pos));
        }
        let mut data = vec![0u8; n as usize];
        self.inner.read_exact(&mut data).map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += n;
        Ok(data)
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| format!("a name that is not UTF-8 before byte {}", self.pos))
    }

    fn check_end(&self, end: u64) -> Result<(), String> {
        if self.pos == end {
            Ok(())
        } else {
            Err(format!("a message ends at byte {} instead of {end}", self.pos))
        }
    }
}

fn read_graph(
    r: &mut Reader,
    end: u64,
    model: &Path,
    dir: &Path,
    found: &mut BTreeMap<String, Initializer>,
) -> Result<(), String> {
    while r.pos < end {
        let (field, wire) = r.key()?;
        if field == 5 && wire == LEN {
            let size = r.varint()?;
            let tensor_end = r.pos + size;
            let (name, initializer) = read_tensor(r, tensor_end, model, dir)?;
            found.insert(name, initializer);
        } else {
            r.skip(wire)?;
        }
    }
    r.check_end(end)
}

fn read_tensor(r: &mut Reader, end: u64, model: &Path, dir: &Path) -> Result<(String, Initializer), String> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0i64;
    let mut raw: Option<(u64, u64)> = None;
    let mut external: BTreeMap<String, String> = BTreeMap::new();
    let mut external_location = false;
    while r.pos < end {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, VARINT) => dims.push(r.varint()? as i64),
            (1, LEN) => {
                let size = r.varint()?;
                let packed_end = r.pos + size;
                while r.pos < packed_end {
                    dims.push(r.varint()? as i64);
                }
                r.check_end(packed_end)?;
            }
            (2, VARINT) => data_type = r.varint()? as i64,
            (8, LEN) => name = r.string()?,
            (9, LEN) => {
                let size = r.varint()?;
                raw = Some((r.pos, size));
                r.advance(size)?;
            }
            (13, LEN) => {
                let size = r.varint()?;
                let entry_end = r.pos + size;
                let (mut key, mut value) = (String::new(), String::new());
                while r.pos < entry_end {
                    match r.key()? {
                        (1, LEN) => key = r.string()?,
                        (2, LEN) => value = r.string()?,
                        (_, wire) => r.skip(wire)?,
                    }
                }
                r.check_end(entry_end)?;
                external.insert(key, value);
            }
            (14, VARINT) => external_location = r.varint()? == 1,
            (_, wire) => r.skip(wire)?,
        }
    }
    r.check_end(end)?;
    let dims = dims
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| format!("initializer {name}: negative dimension {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = if external_location {
        let location = external.get("location").ok_or_else(|| format!("initializer {name}: no external location"))?;
        if location.contains("..") || Path::new(location).is_absolute() {
            return Err(format!("initializer {name}: external location {location:?} leaves the package"));
        }
        let number = |key: &str| -> Result<Option<u64>, String> {
            external
                .get(key)
                .map(|v| v.parse::<u64>().map_err(|_| format!("initializer {name}: external {key} {v:?}")))
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        Some((dir.join(location), offset, length))
    } else {
        raw.map(|(offset, length)| (model.to_path_buf(), offset, Some(length)))
    };
    let element_type = ElementType::from_onnx(data_type);
    let numel = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let numel = numel.ok_or_else(|| format!("initializer {name}: dims {dims:?} overflow"))?;
    let expected = match element_type {
        Some(t) => Some(
            numel.checked_mul(t.size() as u64).ok_or_else(|| format!("initializer {name}: dims {dims:?} overflow"))?,
        ),
        None => None,
    };
    let bytes = match bytes {
        Some((file, offset, length)) => {
            let length = length.or(expected).ok_or_else(|| format!("initializer {name}: no length"))?;
            Some((file, offset, length))
        }
        None => None,
    };
    if let (Some((_, _, length)), Some(expected)) = (&bytes, expected) {
        if *length != expected {
            return Err(format!("initializer {name}: {length} bytes for dims {dims:?}, expected {expected}"));
        }
    }
    Ok((name, Initializer { dims, element_type, bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    /// A model whose one float initializer `w` of `dims` lives in `data.bin` at `offset`, `length`.
    fn model(dims: &[u64], offset: u64, length: u64) -> Vec<u8> {
        let entry = |key: &str, value: &str| {
            let mut e = Vec::new();
            field(1, key.as_bytes(), &mut e);
            field(2, value.as_bytes(), &mut e);
            e
        };
        let mut tensor = Vec::new();
        for &d in dims {
            varint(1 << 3, &mut tensor);
            varint(d, &mut tensor);
        }
        varint(2 << 3, &mut tensor);
        varint(1, &mut tensor); // FLOAT
        field(8, b"w", &mut tensor);
        field(13, &entry("location", "data.bin"), &mut tensor);
        field(13, &entry("offset", &offset.to_string()), &mut tensor);
        field(13, &entry("length", &length.to_string()), &mut tensor);
        varint(14 << 3, &mut tensor);
        varint(1, &mut tensor); // EXTERNAL
        let mut graph = Vec::new();
        field(5, &tensor, &mut graph);
        let mut model = Vec::new();
        field(7, &graph, &mut model);
        model
    }

    /// The external length is the graph's claim: 4 TiB over an empty data file was allocated
    /// before reading, which aborted the process.
    #[test]
    fn external_data_past_the_file_is_an_error_before_allocating() {
        let dir = std::env::temp_dir().join(format!("zimage-initializers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data.bin"), [0u8; 16]).unwrap();
        let path = dir.join("model.onnx");

        std::fs::write(&path, model(&[1 << 20, 1 << 20], 0, 1 << 42)).unwrap();
        let e = read_initializers(&path).unwrap()["w"].read_bytes().unwrap_err();
        assert!(e.contains("4398046511104 bytes at offset 0 run past the end of the file (16 bytes)"), "{e}");

        std::fs::write(&path, model(&[2, 2], 8, 16)).unwrap();
        let e = read_initializers(&path).unwrap()["w"].read_bytes().unwrap_err();
        assert!(e.contains("run past the end"), "{e}");
        std::fs::write(&path, model(&[2, 2], 0, 16)).unwrap();
        assert_eq!(read_initializers(&path).unwrap()["w"].read_bytes().unwrap(), vec![0u8; 16]);

        // Dimensions whose product overflows are refused while reading the graph.
        std::fs::write(&path, model(&[1 << 40, 1 << 40], 0, 16)).unwrap();
        let e = read_initializers(&path).unwrap_err();
        assert!(e.contains("overflow"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
