//! The `realm` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use realm_gguf::{FileSource, GgufFile};
use realm_tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(name = "realm", version, about = "Run LLMs as a WebAssembly component")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe a GGUF file: architecture, hyper-parameters, tokenizer, tensors.
    Inspect {
        /// The GGUF file (default: the default model under models/).
        model: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        /// The GGUF file whose vocabulary to use.
        #[arg(long, short)]
        model: Option<PathBuf>,
        /// Do not add BOS/EOS even where the model asks for them.
        #[arg(long)]
        no_bos: bool,
        /// Treat control-token text such as `<|im_start|>` as ordinary characters.
        #[arg(long)]
        no_parse_special: bool,
        text: String,
    },
}

fn open(path: &Path) -> anyhow::Result<(FileSource, GgufFile)> {
    let src = FileSource::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file = GgufFile::read(&src)
        .with_context(|| format!("{} is not a usable GGUF file", path.display()))?;
    Ok((src, file))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { model, json } => {
            let path = model.unwrap_or_else(realm_host::default_model_path);
            let (_, file) = open(&path)?;
            if json {
                println!("{}", realm_host::inspect::report_json(&file));
            } else {
                print!(
                    "{}",
                    realm_host::inspect::report(&file, &path.display().to_string())
                );
            }
        }
        Command::Tokenize {
            model,
            no_bos,
            no_parse_special,
            text,
        } => {
            let path = model.unwrap_or_else(realm_host::default_model_path);
            let (_, file) = open(&path)?;
            let tok = Tokenizer::from_metadata(&file.metadata)
                .with_context(|| format!("{} has no usable tokenizer", path.display()))?;
            let ids = tok.encode(&text, !no_bos, !no_parse_special)?;
            println!("{}", serde_json::to_string(&ids)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, causes joined: no backtrace for errors the user can fix.
            eprintln!("realm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
