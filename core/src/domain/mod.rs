//! The words of Hotpath's domain, as types: a message's state, a push platform, and the other
//! small closed vocabularies that travel on the wire, sit in Postgres columns and label
//! metrics.
//!
//! Each word is spelled in exactly one `match` (its `as_str`), and everything else is derived
//! from it: serde writes and reads that spelling, Postgres stores it as `text` (the columns
//! have always held these strings, so no migration), `Display` prints it and `FromStr` parses
//! it. A handler can therefore neither misspell a state nor invent a metric label; a label
//! can only take one of the values listed here. One file per concept; [`closed_words!`]
//! writes the shared impls so that the spelling is the only thing each file says.
//!
//! Vocabularies a pushed policy may widen (content type, priority) are not closed: they keep
//! any value on the wire and in Postgres, and fold what Hotpath does not know into one
//! `other` metric label (see their docs).

use std::fmt;

/// Declares a closed vocabulary: the enum, its `ALL` list and its one spelling `match`, with
/// `Display`, `FromStr`, serde and Postgres `text` impls derived from that spelling.
macro_rules! closed_words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident as $what:literal {
            $($(#[$variant_meta:meta])* $variant:ident => $word:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($word),+].len()] = [$($name::$variant),+];

            /// The one spelling: on the wire, in Postgres and as a metric label.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::domain::UnknownWord;

            fn from_str(text: &str) -> Result<$name, Self::Err> {
                $name::ALL
                    .into_iter()
                    .find(|value| value.as_str() == text)
                    .ok_or_else(|| $crate::domain::UnknownWord::new($what, text))
            }
        }

        $crate::domain::spelled_by_as_str!($name);
    };
}

/// Declares an open vocabulary: the words Hotpath knows, plus `Other` for whatever else a
/// pushed policy lets through. Every value keeps its spelling on the wire and in Postgres;
/// its metric label (`label`) is its word when known and `other` when not, so a label can
/// only take the listed values plus `other`.
macro_rules! open_words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $word:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
            /// A value Hotpath does not know, kept as it was sent.
            Other(Box<str>),
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const KNOWN: [$name; [$($word),+].len()] = [$($name::$variant),+];

            /// The spelling, on the wire and in Postgres.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $word,)+
                    $name::Other(text) => text,
                }
            }

            /// The metric label: the known word, or `other`.
            pub fn label(&self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                    $name::Other(_) => "other",
                }
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> $name {
                $name::KNOWN
                    .into_iter()
                    .find(|value| value.as_str() == text)
                    .unwrap_or_else(|| $name::Other(text.into()))
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;

            fn from_str(text: &str) -> Result<$name, Self::Err> {
                Ok($name::from(text))
            }
        }

        $crate::domain::spelled_by_as_str!($name);
    };
}

/// `Display`, serde and Postgres `text` impls for a type whose `as_str` is its spelling and
/// whose `FromStr` reads it back.
macro_rules! spelled_by_as_str {
    ($name:ident) => {
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<$name, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<$name, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }
    };
}

pub(crate) use spelled_by_as_str;

pub mod content;
pub mod conversation;
pub mod dlq;
pub mod platform;
pub mod state;
pub mod step;

pub use content::{ContentType, Priority};
pub use conversation::ConversationKind;
pub use dlq::DlqSource;
pub use platform::Platform;
pub use state::{MessageState, ReceiptState};
pub use step::PipelineStep;

/// A word that is not one of its vocabulary's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWord {
    what: &'static str,
    text: String,
}

impl UnknownWord {
    pub fn new(what: &'static str, text: &str) -> UnknownWord {
        UnknownWord {
            what,
            text: text.to_string(),
        }
    }
}

impl fmt::Display for UnknownWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {}: {:?}", self.what, self.text)
    }
}

impl std::error::Error for UnknownWord {}
