//! `--config FILE`: a guest's flags in a TOML file, one key per long flag without its dashes
//! (`role = "primary"`, `kernel = "/srv/vm1/vmlinux"`, `memory = "512M"`,
//! `no-deterministic-profile = true`); a flag given on the command line overrides the file's
//! key.
//!
//! The keys are clap's own arguments ([`Args::command`]): every value goes through the same
//! parser as on the command line, and a flag added to [`Args`] is a key of the file with no
//! code here. The file's keys become flags after those of the command line, and the whole is
//! parsed again, so what a run does with a key is exactly what it does with the flag.

use crate::cli::Args;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, Parser};
use std::ffi::OsString;
use std::path::Path;

/// Why the flags could not be read.
#[derive(Debug)]
pub(crate) enum ArgsError {
    /// An error in the command line itself (or `--help`, `--version`): clap prints it and
    /// chooses the exit status.
    Clap(clap::Error),
    /// An error in the configuration file, or in the flags once the file's keys are added:
    /// one line, naming the file (exit status 2).
    Config(String),
}

/// The flags of this run: the command line `argv` (with the program's name first), and the
/// keys of the file that `--config` names where the command line does not give them.
pub(crate) fn args_from(argv: Vec<OsString>) -> Result<Args, ArgsError> {
    let cmd = Args::command();
    // The command line alone, with nothing required yet: the file may give the rest.
    let given = match cmd
        .clone()
        .mut_args(|a| a.required(false))
        .try_get_matches_from(&argv)
    {
        Ok(m) => m,
        // The command line is wrong whatever the file says: clap's own error for it.
        Err(_) => return Args::try_parse_from(&argv).map_err(ArgsError::Clap),
    };
    let Some(path) = given.get_one::<std::path::PathBuf>("config").cloned() else {
        let mut args = Args::try_parse_from(&argv).map_err(ArgsError::Clap)?;
        args.argv = argv.into_iter().skip(1).collect();
        return Ok(args);
    };
    let file = read_file(&path)?;
    let keys = flags_from_file(&cmd, &given, &path, &file)?;
    let command_line = without_config(&argv[1..]);
    let parse = |keys: &[FileKey]| -> Result<Args, ArgsError> {
        let all: Vec<OsString> = argv[..1]
            .iter()
            .chain(&command_line)
            .cloned()
            .chain(keys.iter().flat_map(|k| k.flags.iter().cloned()))
            .collect();
        let mut args = Args::try_parse_from(&all).map_err(|e| {
            ArgsError::Config(format!(
                "{}: {} (on the command line or as a key of the file)",
                path.display(),
                first_line(&e)
            ))
        })?;
        args.argv = all.into_iter().skip(1).collect();
        Ok(args)
    };
    // The file's keys that the role does not take are left out (one file serves every role
    // of a guest on a host); the command line's are refused or ignored as without a file.
    let args = parse(&keys)?;
    let refused = args.role.refuses();
    if keys.iter().any(|k| refused.contains(&k.long.as_str())) {
        let kept: Vec<FileKey> = keys
            .into_iter()
            .filter(|k| !refused.contains(&k.long.as_str()))
            .collect();
        return parse(&kept);
    }
    Ok(args)
}

/// One key of the file, as the flags it stands for.
#[derive(Debug)]
struct FileKey {
    /// The flag's long name.
    long: String,
    /// `--long=VALUE` (one per value), `--long` for a switch that is on, nothing for one off.
    flags: Vec<OsString>,
}

fn read_file(path: &Path) -> Result<toml::Table, ArgsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ArgsError::Config(format!("cannot read configuration {}: {e}", path.display()))
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = text.get(..s.start).unwrap_or(text.as_str());
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        ArgsError::Config(format!(
            "{}{at}: not a valid TOML file: {}",
            path.display(),
            e.message().trim_end().replace('\n', " ")
        ))
    })
}

/// The flags the file's keys stand for, each checked as the command line would check it;
/// keys that the command line gives are left out.
fn flags_from_file(
    cmd: &Command,
    given: &ArgMatches,
    path: &Path,
    file: &toml::Table,
) -> Result<Vec<FileKey>, ArgsError> {
    let bad = |key: &str, why: String| {
        ArgsError::Config(format!("{}: key `{key}`: {why}", path.display()))
    };
    let mut keys: Vec<FileKey> = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (key, value) in file {
        let arg = flag_named(cmd, key).ok_or_else(|| bad(key, unknown_key(cmd, key)))?;
        let long = arg.get_long().unwrap_or(key.as_str());
        if let Some(other) = seen.iter().find(|(l, _)| l == long) {
            return Err(bad(
                key,
                format!("`--{long}` is given twice, also as `{}`", other.1),
            ));
        }
        seen.push((long.to_string(), key.clone()));
        // Checked even where the command line overrides it: a wrong key is wrong in every use.
        let flags = as_flags(arg, long, value).map_err(|why| bad(key, why))?;
        check_values(arg, &flags).map_err(|why| bad(key, why))?;
        if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        keys.push(FileKey {
            long: long.to_string(),
            flags,
        });
    }
    Ok(keys)
}

/// The argument whose long name (or alias) is `key`, if the file may set it.
fn flag_named<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    if matches!(key, "config" | "help" | "version") {
        return None;
    }
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(key) || a.get_all_aliases().is_some_and(|al| al.contains(&key))
    })
}

fn unknown_key(cmd: &Command, key: &str) -> String {
    let dashed = key.replace('_', "-");
    if key == "config" {
        return "a configuration file does not name another one".to_string();
    }
    match flag_named(cmd, &dashed) {
        Some(_) if dashed != key => format!("not a flag of ftvmm (did you mean `{dashed}`?)"),
        _ => "not a flag of ftvmm: the keys are the long flags without their dashes \
              (`ftvmm --help` lists them)"
            .to_string(),
    }
}

/// A key's value as flags: a switch takes `true` or `false`; a flag with a value takes a string
/// (written as on the command line), or an integer where the value is a number (`memory`,
/// `log-buffer`, `stop-at-exit`); one that may be repeated, an array of them.
fn as_flags(arg: &Arg, long: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let numeric = [
        std::any::TypeId::of::<u64>(),
        std::any::TypeId::of::<u32>(),
        std::any::TypeId::of::<usize>(),
    ]
    .iter()
    .any(|t| arg.get_value_parser().type_id() == *t);
    let one = |v: &toml::Value| -> Result<OsString, String> {
        match v {
            toml::Value::String(s) => Ok(format!("--{long}={s}").into()),
            toml::Value::Integer(i) if numeric => Ok(format!("--{long}={i}").into()),
            other => Err(format!(
                "expected a string (the value of `--{long}` as on the command line), got {}",
                describe(other)
            )),
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("expected true or false, got {}", describe(other))),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items.iter().map(one).collect(),
            v => Ok(vec![one(v)?]),
        },
        _ => Ok(vec![one(value)?]),
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(f) => format!("the number {f}"),
        toml::Value::Boolean(b) => format!("{b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "an array".to_string(),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

/// Runs the flag's own parser on the key's values, as the command line would.
fn check_values(arg: &Arg, flags: &[OsString]) -> Result<(), String> {
    Command::new("ftvmm")
        .no_binary_name(true)
        .arg(arg.clone().required(false))
        .try_get_matches_from(flags)
        .map(|_| ())
        .map_err(|e| {
            use clap::error::{ContextKind, ContextValue};
            if let Some(source) = std::error::Error::source(&e) {
                return source.to_string();
            }
            match (
                e.get(ContextKind::ValidValue),
                e.get(ContextKind::InvalidValue),
            ) {
                (Some(ContextValue::Strings(valid)), Some(ContextValue::String(got))) => {
                    format!("expected one of {}, got `{got}`", valid.join(", "))
                }
                _ => first_line(&e),
            }
        })
}

/// Clap's message on one line, without its `error: ` and its usage: the first line, and the
/// indented lines after it (the arguments a `not provided` names).
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    for more in lines.take_while(|l| l.starts_with(' ')) {
        line.push(' ');
        line.push_str(more.trim());
    }
    line
}

/// The command line without `--config FILE` (the file's keys are written out instead).
fn without_config(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            it.next();
            continue;
        }
        if a.to_str().is_some_and(|s| s.starts_with("--config=")) {
            continue;
        }
        out.push(a.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Role;
    use std::path::PathBuf;

    /// Writes `text` to a file of its own and parses `ftvmm --config FILE <args>`.
    fn with_file(name: &str, text: &str, args: &[&str]) -> (PathBuf, Result<Args, ArgsError>) {
        let dir = std::env::temp_dir().join(format!("ftvmm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let mut argv: Vec<OsString> = vec!["ftvmm".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let parsed = args_from(argv);
        (path, parsed)
    }

    fn config_error(r: Result<Args, ArgsError>) -> String {
        match r {
            Err(ArgsError::Config(e)) => e,
            Err(ArgsError::Clap(e)) => panic!("a clap error, not the file's: {e}"),
            Ok(a) => panic!("accepted: {a:?}"),
        }
    }

    const GUEST: &str = r#"
# a guest
role = "primary"
kernel = "/srv/vm1/vmlinux"
memory = 536870912
listen = "10.0.0.1:7000"
primary = "10.0.0.2:7000"          # for when this host's side runs as the backup
lock = "etcd:10.0.0.3:2379/ftvmm/vm1"
no-deterministic-profile = true
peer-timeout = "3s"
"#;

    /// `--ack-timer behind|always` (default behind), and its former name `--prompt-acks
    /// off|on`, in a file and on the command line.
    #[test]
    fn the_ack_timer_and_its_former_name() {
        use crate::cli::AckTimerArg;
        let parse = |args: &[&str]| {
            let mut argv: Vec<OsString> = ["ftvmm", "--role", "backup", "--kernel", "k"]
                .iter()
                .map(OsString::from)
                .collect();
            argv.extend(args.iter().map(OsString::from));
            args_from(argv).unwrap().ack_timer
        };
        assert_eq!(parse(&[]), AckTimerArg::Behind);
        assert_eq!(parse(&["--ack-timer", "always"]), AckTimerArg::Always);
        assert_eq!(parse(&["--ack-timer", "behind"]), AckTimerArg::Behind);
        assert_eq!(parse(&["--prompt-acks", "on"]), AckTimerArg::Always);
        assert_eq!(parse(&["--prompt-acks", "off"]), AckTimerArg::Behind);
        let (_, args) = with_file(
            "ack-timer",
            "role = \"backup\"\nkernel = \"k\"\nack-timer = \"always\"\n",
            &[],
        );
        assert_eq!(args.unwrap().ack_timer, AckTimerArg::Always);
        let (_, args) = with_file(
            "prompt-acks",
            "role = \"backup\"\nkernel = \"k\"\nprompt-acks = \"on\"\n",
            &[],
        );
        assert_eq!(args.unwrap().ack_timer, AckTimerArg::Always);
    }

    #[test]
    fn the_file_gives_the_flags() {
        let (_, args) = with_file("guest", GUEST, &[]);
        let args = args.unwrap();
        assert_eq!(args.role, Role::Primary);
        assert_eq!(args.kernel, PathBuf::from("/srv/vm1/vmlinux"));
        assert_eq!(args.memory, 512 << 20);
        assert_eq!(args.listen.as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(args.lock.as_deref(), Some("etcd:10.0.0.3:2379/ftvmm/vm1"));
        assert!(args.no_deterministic_profile);
        assert_eq!(args.failover_timeout, std::time::Duration::from_secs(3));
        // A primary takes no --primary: the file's is left out, not refused.
        assert_eq!(args.primary, None);
        // Defaults stay defaults.
        assert_eq!(args.cmdline, "console=ttyS0");
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let (_, args) = with_file(
            "override",
            GUEST,
            &[
                "--role",
                "backup",
                "--memory=1G",
                "--listen",
                "10.0.0.9:7000",
            ],
        );
        let args = args.unwrap();
        assert_eq!(args.role, Role::Backup);
        assert_eq!(args.memory, 1 << 30);
        assert_eq!(args.listen.as_deref(), Some("10.0.0.9:7000"));
        // A backup takes the file's --primary.
        assert_eq!(args.primary.as_deref(), Some("10.0.0.2:7000"));
    }

    #[test]
    fn the_next_run_gets_the_files_keys_as_flags() {
        let (_, args) = with_file("argv", GUEST, &["--role", "backup"]);
        let argv: Vec<String> = args
            .unwrap()
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!argv.iter().any(|a| a.starts_with("--config")), "{argv:?}");
        assert_eq!(argv[..2], ["--role", "backup"]);
        for flag in [
            "--kernel=/srv/vm1/vmlinux",
            "--primary=10.0.0.2:7000",
            "--no-deterministic-profile",
            "--failover-timeout=3s",
        ] {
            assert!(argv.iter().any(|a| a == flag), "{flag} not in {argv:?}");
        }
        assert!(!argv.iter().any(|a| a.starts_with("--role=")), "{argv:?}");
    }

    #[test]
    fn flags_on_the_command_line_need_no_file() {
        let argv = ["ftvmm", "--role", "standalone", "--kernel", "k"].map(OsString::from);
        let args = args_from(argv.to_vec()).unwrap();
        assert_eq!(args.role, Role::Standalone);
        assert_eq!(args.argv, argv[1..]);
    }

    #[test]
    fn bad_files_name_the_file_the_key_and_what_was_expected() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("kernel = \"k\"\nrole = \"sideways\"", "key `role`: expected one of standalone, replay, primary, backup, standby, got `sideways`", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nmemory = \"12X\"", "key `memory`: expected a size like 256M", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nmemory = true", "key `memory`: expected a string (the value of `--memory` as on the command line), got true", &[]),
            ("role = \"standalone\"\nkernel = 3.5", "key `kernel`: expected a string", &[]),
            ("role = \"standalone\"\nkernel = 3", "key `kernel`: expected a string (the value of `--kernel` as on the command line), got the integer 3", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nno-deterministic-profile = \"yes\"", "key `no-deterministic-profile`: expected true or false, got the string \"yes\"", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nframes = 3", "key `frames`: not a flag of ftvmm", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nkey_file = \"x\"", "key `key_file`: not a flag of ftvmm (did you mean `key-file`?)", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\nconfig = \"x\"", "key `config`: a configuration file does not name another one", &[]),
            ("role = \"standalone\"\nkernel = \"k\"\n[net]\ntap = \"t\"", "key `net`: expected a string", &[]),
            ("role = \"standalone\"\nfailover-timeout = \"1s\"\npeer-timeout = \"2s\"\nkernel = \"k\"", "is given twice", &[]),
            ("role = \"standalone\"\nkernel = \"k\nmemory = 3", "not a valid TOML file", &[]),
            ("role = \"standalone\"", "the following required arguments were not provided: --kernel <KERNEL> (on the command line", &[]),
            // Wrong in the file although the command line overrides it.
            ("role = \"standalone\"\nkernel = \"k\"\nmemory = \"12X\"", "key `memory`", &["--memory", "1G"]),
        ];
        for (i, (text, needle, args)) in cases.iter().enumerate() {
            let (path, r) = with_file(&format!("bad{i}"), text, args);
            let e = config_error(r);
            assert!(
                e.starts_with(&path.display().to_string()) && e.contains(needle),
                "case {i}: {e:?} should name the file and say {needle:?}"
            );
            assert!(!e.contains('\n'), "case {i}: one line: {e:?}");
        }
    }

    #[test]
    fn a_toml_error_says_where() {
        let (path, r) = with_file("where", "role = \"standalone\"\nkernel = \n", &[]);
        let e = config_error(r);
        assert!(
            e.starts_with(&format!("{}:2:", path.display())),
            "line and column: {e}"
        );
    }

    #[test]
    fn a_missing_file_is_one_error() {
        let argv = ["ftvmm", "--config", "/nonexistent/vm1.toml"].map(OsString::from);
        let e = config_error(args_from(argv.to_vec()));
        assert!(
            e.starts_with("cannot read configuration /nonexistent/vm1.toml: "),
            "{e}"
        );
    }

    #[test]
    fn a_bad_command_line_is_clap_s_error() {
        let (_, r) = with_file("cmdline", GUEST, &["--frobnicate"]);
        assert!(matches!(r, Err(ArgsError::Clap(_))), "{r:?}");
    }

    #[test]
    fn the_packaged_example_reads() {
        let example = include_str!("../../../packaging/example.toml");
        for (role, extra) in [("primary", &[][..]), ("backup", &["--role", "backup"][..])] {
            let (_, args) = with_file(&format!("example-{role}"), example, extra);
            let args = args.unwrap_or_else(|e| panic!("packaging/example.toml: {e:?}"));
            assert_eq!(args.memory, 512 << 20);
            assert_eq!(args.primary.is_some(), role == "backup", "{role}");
        }
    }

    #[test]
    fn every_flag_but_config_help_and_version_is_a_key() {
        let cmd = Args::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let is_key = flag_named(&cmd, long).is_some();
            assert_eq!(
                is_key,
                !matches!(long, "config" | "help" | "version"),
                "{long}"
            );
        }
    }
}
