//! `kernel_info_request` / `kernel_info_reply`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LanguageInfo {
    pub name: String,
    pub version: String,
    pub mimetype: String,
    pub file_extension: String,
    pub pygments_lexer: String,
    pub codemirror_mode: CodemirrorMode,
    pub nbconvert_exporter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodemirrorMode {
    pub name: String,
    pub version: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelpLink {
    pub text: String,
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelInfoReply {
    pub status: String,
    pub protocol_version: String,
    pub implementation: String,
    pub implementation_version: String,
    pub language_info: LanguageInfo,
    pub banner: String,
    pub help_links: Vec<HelpLink>,
    pub debugger: bool,
    pub supported_features: Vec<String>,
}

impl KernelInfoReply {
    /// The implementation is reported as IPython's, as ipykernel does: the
    /// shell that runs the code is IPython's, and clients that special-case
    /// Python kernels look for it. notebookos names itself in the banner.
    pub fn new(python_version: &str, ipython_version: &str) -> Self {
        let major = python_version.split('.').next().unwrap_or("3");
        Self {
            status: "ok".into(),
            protocol_version: super::PROTOCOL_VERSION.into(),
            implementation: "ipython".into(),
            implementation_version: ipython_version.into(),
            language_info: LanguageInfo {
                name: "python".into(),
                version: python_version.into(),
                mimetype: "text/x-python".into(),
                file_extension: ".py".into(),
                pygments_lexer: format!("ipython{major}"),
                codemirror_mode: CodemirrorMode {
                    name: "ipython".into(),
                    version: major.parse().unwrap_or(3),
                },
                nbconvert_exporter: "python".into(),
            },
            banner: format!(
                "Python {python_version} | notebookos {} (Rust kernel) | IPython {ipython_version}",
                env!("CARGO_PKG_VERSION")
            ),
            help_links: vec![
                HelpLink {
                    text: "Python Reference".into(),
                    url: "https://docs.python.org/3/".into(),
                },
                HelpLink {
                    text: "IPython Reference".into(),
                    url: "https://ipython.org/documentation.html".into(),
                },
            ],
            debugger: false,
            supported_features: vec!["kernel subshells".into()],
        }
    }
}
