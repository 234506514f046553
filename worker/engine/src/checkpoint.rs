//! Sharded safetensors checkpoints: `model.safetensors.index.json` + shards, or one
//! `model.safetensors`. Files are memory-mapped; tensors are views into the mapping.

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Bytes of one file, memory-mapped or built into the binary.
pub type FileBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where the files of a model directory come from.
#[derive(Clone)]
pub enum ModelFiles {
    Dir(PathBuf),
    /// Files compiled into the binary (the embedded default model), by file name.
    Embedded(&'static [(&'static str, &'static [u8])]),
}

impl ModelFiles {
    pub fn describe(&self) -> String {
        match self {
            ModelFiles::Dir(dir) => dir.display().to_string(),
            ModelFiles::Embedded(_) => "<embedded model>".to_string(),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            ModelFiles::Dir(dir) => dir.join(name).is_file(),
            ModelFiles::Embedded(files) => files.iter().any(|(n, _)| *n == name),
        }
    }

    /// Maps a file; `Ok(None)` when it does not exist.
    pub fn open(&self, name: &str) -> Result<Option<FileBytes>> {
        match self {
            ModelFiles::Dir(dir) => {
                let path = dir.join(name);
                if !path.is_file() {
                    return Ok(None);
                }
                let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                // SAFETY: the checkpoint is treated as read-only; a file truncated or rewritten while
                // mapped is outside what any mmap-based loader can defend against.
                let map = unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("cannot memory-map {}", path.display()))?;
                Ok(Some(Arc::new(map)))
            }
            ModelFiles::Embedded(files) => Ok(files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, bytes)| Arc::new(*bytes) as FileBytes)),
        }
    }

    pub fn read_string(&self, name: &str) -> Result<Option<String>> {
        let Some(bytes) = self.open(name)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8((*bytes).as_ref())
            .with_context(|| format!("{} in {} is not UTF-8", name, self.describe()))?;
        Ok(Some(text.to_string()))
    }
}

/// A tensor inside a mapped file.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub file: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    bytes: FileBytes,
    start: usize,
    end: usize,
}

impl TensorRef {
    pub fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.start..self.end]
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }

    /// Checks shape and dtype, naming the tensor and its file on mismatch.
    pub fn expect(&self, dtypes: &[Dtype], shape: &[usize]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            bail!(
                "tensor `{}` in {} has dtype {:?}, expected one of {:?}",
                self.name,
                self.file,
                self.dtype,
                dtypes
            );
        }
        if self.shape != shape {
            bail!(
                "tensor `{}` in {} has shape {:?}, expected {:?}",
                self.name,
                self.file,
                self.shape,
                shape
            );
        }
        Ok(())
    }

    /// Reads a float tensor (F32, BF16 or F16) into f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let data = self.data();
        Ok(match self.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => bail!(
                "tensor `{}` in {} has dtype {:?}, expected a float type",
                self.name,
                self.file,
                other
            ),
        })
    }
}

/// One safetensors file: where its tensors' bytes lie once it is mapped.
struct OpenShard {
    bytes: FileBytes,
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// A shard file, mapped on the first read of one of its tensors: a directory that holds only a
/// role's files (an expert shard's, an attention rank's) opens without the others.
struct Shard {
    file: String,
    open: OnceLock<OpenShard>,
}

/// All tensors of a checkpoint, by name.
pub struct Checkpoint {
    files: ModelFiles,
    source: String,
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(files: &ModelFiles) -> Result<Self> {
        let source = files.describe();
        let mut checkpoint = Checkpoint {
            files: files.clone(),
            source: source.clone(),
            shards: Vec::new(),
            location: HashMap::new(),
        };
        if let Some(index) = files.read_string(INDEX_FILE)? {
            let map = weight_map(&index).with_context(|| format!("in {source}/{INDEX_FILE}"))?;
            let shard_names: BTreeSet<&str> = map.values().map(String::as_str).collect();
            let numbered: HashMap<&str, usize> = shard_names.iter().enumerate().map(|(i, &f)| (f, i)).collect();
            checkpoint.shards = shard_names
                .iter()
                .map(|&file| Shard {
                    file: file.to_string(),
                    open: OnceLock::new(),
                })
                .collect();
            checkpoint.location = map
                .iter()
                .map(|(tensor, file)| (tensor.clone(), numbered[file.as_str()]))
                .collect();
        } else if files.exists(SINGLE_FILE) {
            let shard = Shard {
                file: SINGLE_FILE.to_string(),
                open: OnceLock::new(),
            };
            let opened = open_shard(files, &shard.file)?;
            checkpoint.location = opened.tensors.keys().map(|name| (name.clone(), 0)).collect();
            let _ = shard.open.set(opened);
            checkpoint.shards.push(shard);
        } else {
            bail!("{source} holds neither {INDEX_FILE} nor {SINGLE_FILE}");
        }
        Ok(checkpoint)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.location.keys()
    }

    pub fn get(&self, name: &str) -> Result<TensorRef> {
        let &shard_index = self
            .location
            .get(name)
            .with_context(|| format!("tensor `{name}` is missing from the checkpoint in {}", self.source))?;
        let shard = &self.shards[shard_index];
        let opened = match shard.open.get() {
            Some(opened) => opened,
            None => {
                // Two threads may map the same shard at once; one mapping is kept.
                let opened = open_shard(&self.files, &shard.file)?;
                shard.open.get_or_init(|| opened)
            }
        };
        let info = opened.tensors.get(name).with_context(|| {
            format!(
                "{INDEX_FILE} places tensor `{name}` in {}/{}, which does not hold it",
                self.source, shard.file
            )
        })?;
        Ok(TensorRef {
            name: name.to_string(),
            file: format!("{}/{}", self.source, shard.file),
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: opened.bytes.clone(),
            start: opened.data_start + info.data_offsets.0,
            end: opened.data_start + info.data_offsets.1,
        })
    }
}

fn open_shard(files: &ModelFiles, file: &str) -> Result<OpenShard> {
    let source = files.describe();
    let bytes = files
        .open(file)?
        .with_context(|| format!("shard {file} named by the index is missing from {source}"))?;
    let (header_len, metadata) = SafeTensors::read_metadata((*bytes).as_ref()).map_err(|e| {
        anyhow::anyhow!("{source}/{file} is not a valid safetensors file (truncated or corrupt?): {e:?}")
    })?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok(OpenShard {
        bytes,
        data_start: 8 + header_len,
        tensors,
    })
}

/// The shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file form of a checkpoint (no index).
pub const SINGLE_FILE: &str = "model.safetensors";

/// The index's `weight_map`: tensor name -> shard file, each file checked to lie inside the
/// model directory.
pub fn weight_map(index: &str) -> Result<BTreeMap<String, String>> {
    let value: serde_json::Value = serde_json::from_str(index).context("index is not valid JSON")?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("index has no `weight_map` object")?;
    let mut files = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("`weight_map.{tensor}` must be a file name"))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.contains("..") {
            bail!("`weight_map.{tensor}` names `{file}`, which is outside the model directory");
        }
        files.insert(tensor.clone(), file.to_string());
    }
    Ok(files)
}

/// Whether the checkpoint in `files` holds tensor `name` (by its index; no shard is mapped);
/// `None` where `files` holds no weights at all (the router's view of a single-file checkpoint).
pub fn holds_tensor(files: &ModelFiles, name: &str) -> Result<Option<bool>> {
    if !files.exists(INDEX_FILE) && !files.exists(SINGLE_FILE) {
        return Ok(None);
    }
    Ok(Some(Checkpoint::open(files)?.contains(name)))
}

/// Convenience for `Checkpoint::open(&ModelFiles::Dir(..))`.
pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
    Checkpoint::open(&ModelFiles::Dir(dir.to_path_buf()))
}
