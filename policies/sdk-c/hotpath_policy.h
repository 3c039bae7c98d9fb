/*
 * hotpath_policy.h: write a Hotpath policy (policies/ABI.md, version 1) as one C function.
 *
 *     #include "hotpath_policy.h"
 *
 *     static hp_verdict validate(const hp_input *in) {
 *         const hp_value *content = hp_get(hp_request(in), "content");
 *         if (hp_str_eq(content, "boom")) return hp_reject(HP_FORBIDDEN, "no booms");
 *         return hp_allow();
 *     }
 *
 *     HOTPATH_POLICY(validate)
 *
 * Header-only, for one translation unit (a policy is one .c file), with no libc: it builds
 * with `clang-22 --target=wasm32 -nostdlib -ffreestanding` (policies/sdk-c/build.sh) and, for
 * unit tests, natively with any C11 compiler.
 *
 * What HOTPATH_POLICY(f) generates, on wasm32 only:
 *   hotpath_abi_version()   returns 1;
 *   hotpath_alloc(len)      the next `len` bytes of a bump allocator (never 0 for len >= 0,
 *                           0 for len < 0), which starts at __heap_base, uses the module's
 *                           initial memory first and grows memory only when that runs out;
 *                           nothing is freed, as the host uses a fresh instance per message;
 *   hotpath_validate(p, n)  parses the input into a read-only tree in that heap, checks it is
 *                           the ABI's input object, calls f, writes the verdict's JSON and
 *                           returns (out_ptr << 32) | out_len.
 * Elsewhere it generates nothing; hp_evaluate() is the same bytes-in, bytes-out path for
 * native tests.
 *
 * Input the SDK cannot read (not strict UTF-8 JSON, or not the ABI's shape: user.id missing,
 * a member that is not a string, ...) means a host bug, not a bad message: the SDK then does
 * not call f and answers {"verdict":"error","message":"..."}, which the host counts as a
 * policy failure. The same answer covers a builder that ran out of memory or nesting.
 *
 * Output: a reject message is cut to 1,000 characters; if a verdict would still exceed the
 * host's 64 KiB, its details are dropped ({}); a normalised request that is too large is left
 * as it is and the host reports the failure. Strings written to the output are escaped, and
 * any bytes in them that are not UTF-8 become U+FFFD, so the output is always valid JSON.
 *
 * Every accessor takes NULL (a missing value) and answers "absent": hp_get(NULL, "k") is
 * NULL, hp_str(NULL, &n) is NULL, hp_array_len(NULL) is 0. Chains of lookups need no checks
 * in between. The parser never reads past the input and never recurses, so no input can
 * overflow the stack.
 */
#ifndef HOTPATH_POLICY_H
#define HOTPATH_POLICY_H

#define HP_ABI_VERSION 1
/* The most characters of a reject message the host accepts. */
#define HP_MAX_MESSAGE_CHARS 1000
/* The most bytes of output the host reads. */
#define HP_MAX_OUTPUT_BYTES (64 * 1024)
/* The deepest nesting the parser and the writer accept: far past the 128 levels the gateway
 * accepts in a request body (the input wraps it two levels deeper). */
#define HP_MAX_DEPTH 512

#define HP_API static inline __attribute__((unused))

typedef unsigned char hp_u8;
typedef unsigned int hp_u32;
typedef unsigned long long hp_u64;
typedef long long hp_i64;
typedef __SIZE_TYPE__ hp_size;
typedef __UINTPTR_TYPE__ hp_uptr;

/* ========================================================================================== */
/* The heap: a bump allocator. On wasm32 it is the module's memory past the static data; in   */
/* a native build it is a static arena (HP_NATIVE_ARENA bytes), reset with hp_reset().         */

#if defined(__wasm32__)
extern hp_u8 __heap_base;
#else
#ifndef HP_NATIVE_ARENA
#define HP_NATIVE_ARENA (16u * 1024 * 1024)
#endif
static _Alignas(16) hp_u8 hp__arena[HP_NATIVE_ARENA] __attribute__((unused));
#endif
static hp_uptr hp__bump __attribute__((unused));

/* `len` fresh bytes, 8-byte aligned, or NULL when memory cannot be had. */
HP_API void *hp_alloc(hp_size len) {
#if defined(__wasm32__)
    if (hp__bump == 0) hp__bump = (hp_uptr)&__heap_base;
    hp_u64 start = ((hp_u64)hp__bump + 7) & ~(hp_u64)7;
    hp_u64 end = start + (hp_u64)(len ? len : 1);
    hp_u64 have = (hp_u64)__builtin_wasm_memory_size(0) * 65536;
    if (end > have) {
        hp_u64 pages = (end - have + 65535) / 65536;
        if (pages > 65536) return 0;
        if (__builtin_wasm_memory_grow(0, (hp_size)pages) == (hp_size)-1) return 0;
    }
    hp__bump = (hp_uptr)end;
    return (void *)(hp_uptr)start;
#else
    hp_u64 start = ((hp_u64)hp__bump + 7) & ~(hp_u64)7;
    hp_u64 need = len ? (hp_u64)len : 1;
    if (start > HP_NATIVE_ARENA || need > HP_NATIVE_ARENA - start) return 0;
    hp__bump = (hp_uptr)(start + need);
    return hp__arena + start;
#endif
}

#if !defined(__wasm32__)
/* Native builds only: forget every allocation, as a fresh instance would. */
HP_API void hp_reset(void) { hp__bump = 0; }
#endif

HP_API void hp__copy(void *to, const void *from, hp_size len) {
    hp_u8 *t = to;
    const hp_u8 *f = from;
    for (hp_size i = 0; i < len; i++) t[i] = f[i];
}

HP_API int hp__bytes_eq(const char *a, const char *b, hp_size len) {
    for (hp_size i = 0; i < len; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

HP_API hp_size hp__cstrlen(const char *s) {
    hp_size n = 0;
    if (s)
        while (s[n]) n++;
    return n;
}

/* ========================================================================================== */
/* The input tree. Strings are decoded (every escape, \uXXXX and surrogate pairs included)    */
/* into UTF-8 with a NUL after the last byte; they may hold NULs themselves (\u0000), so use  */
/* their length. Members of an object keep their order; arrays are contiguous.                */

typedef enum { HP_NULL = 1, HP_BOOL, HP_NUMBER, HP_STRING, HP_ARRAY, HP_OBJECT } hp_kind;

typedef struct hp_value hp_value;
typedef struct hp_member hp_member;

struct hp_value {
    hp_kind kind;
    /* Bytes of a string (without the NUL), items of an array, members of an object, bytes of
     * a number's text. */
    hp_u32 len;
    union {
        int boolean;
        const char *text; /* a string's bytes, or a number's text as it appeared */
        const hp_value *items;
        const hp_member *members;
    } as;
    double number;
};

struct hp_member {
    const char *key; /* decoded like a string, NUL after it */
    hp_u32 key_len;
    hp_value value;
};

/* What a parse failed on, for the error verdict. */
typedef struct {
    const char *what;
    hp_u32 offset;
} hp_parse_error;

/* --- The parser: strict RFC 8259, iterative (an explicit stack in the heap). -------------- */

typedef struct {
    const hp_u8 *p, *start, *end;
    const char *error;
} hp__cursor;

HP_API void hp__ws(hp__cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

HP_API int hp__fail(hp__cursor *c, const char *what) {
    if (!c->error) c->error = what;
    return 0;
}

HP_API int hp__hex4(hp__cursor *c, hp_u32 *out) {
    if (c->end - c->p < 4) return hp__fail(c, "truncated \\u escape");
    hp_u32 v = 0;
    for (int i = 0; i < 4; i++) {
        hp_u8 h = c->p[i];
        hp_u32 d;
        if (h >= '0' && h <= '9') d = h - '0';
        else if (h >= 'a' && h <= 'f') d = h - 'a' + 10;
        else if (h >= 'A' && h <= 'F') d = h - 'A' + 10;
        else return hp__fail(c, "invalid \\u escape");
        v = v * 16 + d;
    }
    c->p += 4;
    *out = v;
    return 1;
}

HP_API hp_u32 hp__put_utf8(hp_u8 *to, hp_u32 cp) {
    if (cp < 0x80) {
        to[0] = (hp_u8)cp;
        return 1;
    }
    if (cp < 0x800) {
        to[0] = (hp_u8)(0xC0 | (cp >> 6));
        to[1] = (hp_u8)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        to[0] = (hp_u8)(0xE0 | (cp >> 12));
        to[1] = (hp_u8)(0x80 | ((cp >> 6) & 0x3F));
        to[2] = (hp_u8)(0x80 | (cp & 0x3F));
        return 3;
    }
    to[0] = (hp_u8)(0xF0 | (cp >> 18));
    to[1] = (hp_u8)(0x80 | ((cp >> 12) & 0x3F));
    to[2] = (hp_u8)(0x80 | ((cp >> 6) & 0x3F));
    to[3] = (hp_u8)(0x80 | (cp & 0x3F));
    return 4;
}

/* The length of the well-formed UTF-8 sequence at s[0..avail) (RFC 3629: no overlongs, no
 * surrogates, nothing past U+10FFFF), or 0 if it is not one. */
HP_API hp_u32 hp__utf8_seq(const hp_u8 *s, hp_size avail) {
    hp_u8 b = s[0];
    if (b < 0x80) return 1;
    hp_u32 n;
    hp_u8 lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) n = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else return 0;
    if (avail < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (hp_u32 i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

/* A string, the cursor on its opening quote, decoded into the heap. */
HP_API int hp__string(hp__cursor *c, const char **text, hp_u32 *len) {
    c->p++; /* the quote */
    /* First the raw extent (the decoded text is never longer), then the decoding. */
    const hp_u8 *q = c->p;
    while (q < c->end && *q != '"') {
        if (*q != '\\') q++;
        else if (c->end - q >= 2) q += 2;
        else return hp__fail(c, "unterminated string");
    }
    if (q >= c->end) return hp__fail(c, "unterminated string");
    if ((hp_u64)(q - c->p) >= 0xFFFFFFFFu) return hp__fail(c, "string too long");
    hp_u8 *out = hp_alloc((hp_size)(q - c->p) + 1);
    if (!out) return hp__fail(c, "out of memory");
    hp_u32 n = 0;
    while (c->p < q) {
        hp_u8 ch = *c->p;
        if (ch < 0x20) return hp__fail(c, "control character in a string");
        if (ch != '\\') {
            hp_u32 seq = hp__utf8_seq(c->p, (hp_size)(q - c->p));
            if (!seq) return hp__fail(c, "invalid UTF-8");
            hp__copy(out + n, c->p, seq);
            n += seq;
            c->p += seq;
            continue;
        }
        c->p++;
        ch = *c->p++; /* q is past it: the raw scan stepped over it */
        switch (ch) {
            case '"': case '\\': case '/': out[n++] = ch; break;
            case 'b': out[n++] = '\b'; break;
            case 'f': out[n++] = '\f'; break;
            case 'n': out[n++] = '\n'; break;
            case 'r': out[n++] = '\r'; break;
            case 't': out[n++] = '\t'; break;
            case 'u': {
                hp_u32 cp;
                if (!hp__hex4(c, &cp)) return 0;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return hp__fail(c, "lone low surrogate");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    hp_u32 low;
                    if (c->end - c->p < 2 || c->p[0] != '\\' || c->p[1] != 'u')
                        return hp__fail(c, "lone high surrogate");
                    c->p += 2;
                    if (!hp__hex4(c, &low)) return 0;
                    if (low < 0xDC00 || low > 0xDFFF) return hp__fail(c, "lone high surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                }
                /* A \u escape inside the raw extent: 6 or 12 bytes give at most 3 or 4. */
                n += hp__put_utf8(out + n, cp);
                break;
            }
            default: return hp__fail(c, "invalid escape");
        }
        if (c->p > q) return hp__fail(c, "unterminated string");
    }
    c->p = q + 1;
    out[n] = 0;
    *text = (const char *)out;
    *len = n;
    return 1;
}

static const double hp__pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                   1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                   1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A number by JSON's grammar. Its value is exact when it has at most 19 significant digits
 * forming an integer below 2^53 and a power-of-ten exponent within +-22 (every integer and
 * every ordinary decimal), else within a few units in the last place; the text is kept. */
HP_API int hp__number(hp__cursor *c, hp_value *v) {
    const hp_u8 *s = c->p;
    int negative = 0;
    if (c->p < c->end && *c->p == '-') {
        negative = 1;
        c->p++;
    }
    hp_u64 mantissa = 0;
    int digits = 0, exp10 = 0;
    if (c->p >= c->end || *c->p < '0' || *c->p > '9') return hp__fail(c, "invalid number");
    if (*c->p == '0') c->p++;
    else
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (digits < 19) mantissa = mantissa * 10 + (hp_u64)(*c->p - '0'), digits++;
            else exp10++;
            c->p++;
        }
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        if (c->p >= c->end || *c->p < '0' || *c->p > '9') return hp__fail(c, "invalid number");
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            /* Digits past the 19th are dropped; zeros before the first significant digit
             * (0.000x) only move the decimal point. */
            if (mantissa == 0 && *c->p == '0') exp10--;
            else if (digits < 19) mantissa = mantissa * 10 + (hp_u64)(*c->p - '0'), digits++, exp10--;
            c->p++;
        }
    }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        int eneg = 0, e = 0;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-')) eneg = *c->p++ == '-';
        if (c->p >= c->end || *c->p < '0' || *c->p > '9') return hp__fail(c, "invalid number");
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (e < 100000) e = e * 10 + (*c->p - '0');
            c->p++;
        }
        exp10 += eneg ? -e : e;
    }
    double x = (double)mantissa;
    if (mantissa != 0) {
        while (exp10 > 22 && x < 1e300) x *= 1e22, exp10 -= 22;
        while (exp10 < -22 && x > 1e-300) x /= 1e22, exp10 += 22;
        if (exp10 > 22) x *= 1e22 * 1e22; /* overflows to infinity */
        else if (exp10 < -22) x = 0;
        else if (exp10 >= 0) x *= hp__pow10[exp10];
        else x /= hp__pow10[-exp10];
    }
    v->kind = HP_NUMBER;
    v->number = negative ? -x : x;
    v->as.text = (const char *)s;
    v->len = (hp_u32)(c->p - s);
    return 1;
}

HP_API int hp__literal(hp__cursor *c, const char *word) {
    hp_size n = hp__cstrlen(word);
    if ((hp_size)(c->end - c->p) < n) return hp__fail(c, "invalid literal");
    for (hp_size i = 0; i < n; i++)
        if (c->p[i] != (hp_u8)word[i]) return hp__fail(c, "invalid literal");
    c->p += n;
    return 1;
}

/* Members or items of the container being read, in order, until it closes. */
typedef struct hp__node {
    hp_member member; /* an item of an array uses only .value */
    struct hp__node *next;
} hp__node;

typedef struct hp__frame {
    hp_value *target;
    int is_object;
    hp_u32 count;
    hp__node *head, *tail;
    struct hp__frame *up;
} hp__frame;

/* A new node at the end of the open container; its value is where the next value goes. */
HP_API hp_value *hp__append(hp__cursor *c, hp__frame *f) {
    hp__node *node = hp_alloc(sizeof *node);
    if (!node || f->count == 0xFFFFFFFFu) {
        hp__fail(c, node ? "container too long" : "out of memory");
        return 0;
    }
    node->member.key = 0;
    node->member.key_len = 0;
    node->next = 0;
    if (f->tail) f->tail->next = node;
    else f->head = node;
    f->tail = node;
    f->count++;
    if (f->is_object) {
        hp__ws(c);
        if (c->p >= c->end || *c->p != '"') {
            hp__fail(c, "expected a key");
            return 0;
        }
        if (!hp__string(c, &node->member.key, &node->member.key_len)) return 0;
        hp__ws(c);
        if (c->p >= c->end || *c->p != ':') {
            hp__fail(c, "expected ':'");
            return 0;
        }
        c->p++;
    }
    return &node->member.value;
}

/* The open container is complete: its nodes become one contiguous array. */
HP_API int hp__close(hp__cursor *c, hp__frame *f) {
    hp_value *v = f->target;
    v->kind = f->is_object ? HP_OBJECT : HP_ARRAY;
    v->len = f->count;
    v->number = 0;
    hp_size size = f->is_object ? sizeof(hp_member) : sizeof(hp_value);
    if ((hp_u64)f->count * size > 0x7FFFFFFF) return hp__fail(c, "container too long");
    hp_u8 *items = hp_alloc(f->count * size);
    if (!items) return hp__fail(c, "out of memory");
    hp_u32 i = 0;
    for (hp__node *n = f->head; n; n = n->next, i++) {
        if (f->is_object) hp__copy(items + i * size, &n->member, size);
        else hp__copy(items + i * size, &n->member.value, size);
    }
    if (f->is_object) v->as.members = (const hp_member *)items;
    else v->as.items = (const hp_value *)items;
    return 1;
}

/* Parses the JSON text text[0..len) (exactly one value, whitespace around it allowed) into the
 * heap. Returns the root, or NULL with *error (if given) saying why. */
HP_API const hp_value *hp_parse(const char *text, hp_size len, hp_parse_error *error) {
    if (!text) text = "", len = 0;
    hp__cursor c = {(const hp_u8 *)text, (const hp_u8 *)text, (const hp_u8 *)text + len, 0};
    hp_value *root = hp_alloc(sizeof *root);
    hp__frame *top = 0;
    hp_u32 depth = 0;
    hp_value *slot = root;
    if (!root) hp__fail(&c, "out of memory");
    while (!c.error) {
        /* A value goes into *slot. */
        hp__ws(&c);
        if (c.p >= c.end) {
            hp__fail(&c, "unexpected end of input");
            break;
        }
        hp_u8 ch = *c.p;
        if (ch == '{' || ch == '[') {
            if (++depth > HP_MAX_DEPTH) {
                hp__fail(&c, "nested too deeply");
                break;
            }
            hp__frame *f = hp_alloc(sizeof *f);
            if (!f) {
                hp__fail(&c, "out of memory");
                break;
            }
            f->target = slot;
            f->is_object = ch == '{';
            f->count = 0;
            f->head = f->tail = 0;
            f->up = top;
            top = f;
            c.p++;
            hp__ws(&c);
            if (c.p < c.end && *c.p == (f->is_object ? '}' : ']')) {
                c.p++;
                /* empty: closed below */
            } else {
                slot = hp__append(&c, f);
                continue;
            }
            if (!hp__close(&c, top)) break;
            top = top->up;
            depth--;
        } else if (ch == '"') {
            slot->kind = HP_STRING;
            slot->number = 0;
            if (!hp__string(&c, &slot->as.text, &slot->len)) break;
        } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
            if (!hp__number(&c, slot)) break;
        } else if (ch == 't' || ch == 'f') {
            if (!hp__literal(&c, ch == 't' ? "true" : "false")) break;
            slot->kind = HP_BOOL;
            slot->as.boolean = ch == 't';
            slot->len = 0;
            slot->number = 0;
        } else if (ch == 'n') {
            if (!hp__literal(&c, "null")) break;
            slot->kind = HP_NULL;
            slot->as.text = 0;
            slot->len = 0;
            slot->number = 0;
        } else {
            hp__fail(&c, "unexpected character");
            break;
        }
        /* After a complete value: the next member or item, or the end of containers. */
        for (;;) {
            hp__ws(&c);
            if (!top) break;
            if (c.p >= c.end) {
                hp__fail(&c, "unexpected end of input");
                break;
            }
            ch = *c.p++;
            if (ch == ',') {
                slot = hp__append(&c, top);
                break;
            }
            if (ch != (top->is_object ? '}' : ']')) {
                hp__fail(&c, top->is_object ? "expected ',' or '}'" : "expected ',' or ']'");
                break;
            }
            if (!hp__close(&c, top)) break;
            top = top->up;
            depth--;
        }
        if (!top) break;
    }
    if (!c.error && c.p != c.end) hp__fail(&c, "trailing characters");
    if (c.error) {
        if (error) {
            error->what = c.error;
            error->offset = (hp_u32)(c.p - c.start);
        }
        return 0;
    }
    return root;
}

/* --- Accessors. ------------------------------------------------------------------------- */

HP_API int hp_is_null(const hp_value *v) { return v && v->kind == HP_NULL; }
HP_API int hp_is_bool(const hp_value *v) { return v && v->kind == HP_BOOL; }
HP_API int hp_is_number(const hp_value *v) { return v && v->kind == HP_NUMBER; }
HP_API int hp_is_string(const hp_value *v) { return v && v->kind == HP_STRING; }
HP_API int hp_is_array(const hp_value *v) { return v && v->kind == HP_ARRAY; }
HP_API int hp_is_object(const hp_value *v) { return v && v->kind == HP_OBJECT; }

/* Whether v is `true`. */
HP_API int hp_is_true(const hp_value *v) { return hp_is_bool(v) && v->as.boolean; }

/* A string's bytes (NUL-terminated, length in *len if len is given), or NULL. */
HP_API const char *hp_str(const hp_value *v, hp_size *len) {
    if (!hp_is_string(v)) return 0;
    if (len) *len = v->len;
    return v->as.text;
}

/* Whether v is a string equal to s[0..len). */
HP_API int hp_str_eqn(const hp_value *v, const char *s, hp_size len) {
    return hp_is_string(v) && v->len == len && hp__bytes_eq(v->as.text, s, len);
}

/* Whether v is a string equal to the NUL-terminated s. */
HP_API int hp_str_eq(const hp_value *v, const char *s) { return hp_str_eqn(v, s, hp__cstrlen(s)); }

/* A string's length in characters (Unicode scalar values), 0 if v is not a string. */
HP_API hp_size hp_utf8_chars(const hp_value *v) {
    if (!hp_is_string(v)) return 0;
    hp_size chars = 0;
    for (hp_u32 i = 0; i < v->len; i++) chars += ((hp_u8)v->as.text[i] & 0xC0) != 0x80;
    return chars;
}

/* A number's value (0 if v is not a number); see hp__number for its precision. */
HP_API double hp_number(const hp_value *v) { return hp_is_number(v) ? v->number : 0; }

/* Whether v is a number written as an integer (no fraction, no exponent) that fits in 64 bits;
 * the value exactly in *out. */
HP_API int hp_integer(const hp_value *v, hp_i64 *out) {
    if (!hp_is_number(v)) return 0;
    const char *s = v->as.text;
    hp_u32 i = 0, n = v->len;
    int negative = n > 0 && s[0] == '-';
    if (negative) i++;
    hp_u64 limit = negative ? (hp_u64)1 << 63 : ((hp_u64)1 << 63) - 1, x = 0;
    if (i >= n) return 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        hp_u64 d = (hp_u64)(s[i] - '0');
        if (x > (limit - d) / 10) return 0;
        x = x * 10 + d;
    }
    if (out) *out = negative && x ? -(hp_i64)(x - 1) - 1 : (hp_i64)x;
    return 1;
}

HP_API hp_size hp_array_len(const hp_value *v) { return hp_is_array(v) ? v->len : 0; }

/* Item i of an array, or NULL. */
HP_API const hp_value *hp_array_at(const hp_value *v, hp_size i) {
    return hp_is_array(v) && i < v->len ? &v->as.items[i] : 0;
}

HP_API hp_size hp_object_len(const hp_value *v) { return hp_is_object(v) ? v->len : 0; }

/* Member i of an object (its key and value), or NULL. */
HP_API const hp_member *hp_object_at(const hp_value *v, hp_size i) {
    return hp_is_object(v) && i < v->len ? &v->as.members[i] : 0;
}

/* The value of key[0..len) in an object, or NULL. Were a key given twice, the last one counts,
 * as when the host parsed it. */
HP_API const hp_value *hp_getn(const hp_value *obj, const char *key, hp_size len) {
    if (!hp_is_object(obj)) return 0;
    for (hp_u32 i = obj->len; i-- > 0;) {
        const hp_member *m = &obj->as.members[i];
        if (m->key_len == len && hp__bytes_eq(m->key, key, len)) return &m->value;
    }
    return 0;
}

/* The value of the NUL-terminated key in an object, or NULL. */
HP_API const hp_value *hp_get(const hp_value *obj, const char *key) {
    return hp_getn(obj, key, hp__cstrlen(key));
}

/* A value by a dotted path, "request.content" or "facts.conversation.members.0": each part
 * is a key of an object, or, all digits, an index of an array. NULL if any part is missing. */
HP_API const hp_value *hp_path(const hp_value *v, const char *path) {
    const char *part = path;
    if (!path) return 0;
    for (;;) {
        hp_size len = 0;
        while (part[len] && part[len] != '.') len++;
        if (hp_is_array(v)) {
            hp_u64 index = 0;
            int digits = len > 0 && len <= 10;
            for (hp_size i = 0; digits && i < len; i++) {
                if (part[i] < '0' || part[i] > '9') digits = 0;
                else index = index * 10 + (hp_u64)(part[i] - '0');
            }
            v = digits ? hp_array_at(v, (hp_size)index) : 0;
        } else {
            v = hp_getn(v, part, len);
        }
        if (!v || !part[len]) return v;
        part += len + 1;
    }
}

static const hp_value hp__empty_array __attribute__((unused)) = {HP_ARRAY, 0, {0}, 0};

/* Whether an array holds the string s. */
HP_API int hp_array_has_str(const hp_value *array, const char *s) {
    for (hp_size i = 0; i < hp_array_len(array); i++)
        if (hp_str_eq(hp_array_at(array, i), s)) return 1;
    return 0;
}

/* ========================================================================================== */
/* The ABI input, checked: the views below are never NULL where the ABI says a value is       */
/* always there, so a policy can use them without checks.                                      */

typedef struct {
    const hp_value *root;          /* the whole input object */
    const hp_value *user_id;       /* a string */
    const hp_value *request;       /* any JSON value, as the client sent it (or normalised) */
    const hp_value *conversation;  /* an object, or NULL when facts.conversation is null */
    const hp_value *sender_blocks; /* an array of strings (empty when absent) */
} hp_input;

/* The authenticated sender's id, its length in *len if given. */
HP_API const char *hp_user_id(const hp_input *in, hp_size *len) { return hp_str(in->user_id, len); }
/* The request, any JSON value (checking its shape is a policy's job). */
HP_API const hp_value *hp_request(const hp_input *in) { return in->request; }
/* facts.conversation, or NULL when there is no such conversation. */
HP_API const hp_value *hp_conversation(const hp_input *in) { return in->conversation; }
/* The conversation's id, or NULL when there is none. */
HP_API const char *hp_conversation_id(const hp_input *in, hp_size *len) {
    return hp_str(hp_get(in->conversation, "id"), len);
}
/* The conversation's type ("direct", "group", ...), or NULL when there is none. */
HP_API const char *hp_conversation_type(const hp_input *in, hp_size *len) {
    return hp_str(hp_get(in->conversation, "type"), len);
}
/* Whether the conversation exists and its type is `type`. */
HP_API int hp_conversation_is(const hp_input *in, const char *type) {
    return hp_str_eq(hp_get(in->conversation, "type"), type);
}
/* Whether the conversation exists and is active. */
HP_API int hp_conversation_is_active(const hp_input *in) {
    return hp_is_true(hp_get(in->conversation, "isActive"));
}
/* The conversation's active members, sorted: an array of strings (NULL when there is none). */
HP_API const hp_value *hp_conversation_members(const hp_input *in) {
    const hp_value *members = hp_get(in->conversation, "members");
    if (in->conversation && (!members || hp_is_null(members))) return &hp__empty_array;
    return members;
}
/* Whether user is an active member of the conversation. */
HP_API int hp_conversation_has_member(const hp_input *in, const char *user) {
    return hp_array_has_str(hp_get(in->conversation, "members"), user);
}
/* Every user the sender has blocked or is blocked by, sorted: an array of strings. */
HP_API const hp_value *hp_sender_blocks(const hp_input *in) { return in->sender_blocks; }
/* Whether a block stands between the sender and user. */
HP_API int hp_blocks(const hp_input *in, const char *user) {
    return hp_array_has_str(in->sender_blocks, user);
}

HP_API int hp__all_strings(const hp_value *array) {
    if (!hp_is_array(array)) return 0;
    for (hp_u32 i = 0; i < array->len; i++)
        if (!hp_is_string(&array->as.items[i])) return 0;
    return 1;
}

/* The input's shape, as the ABI defines it; NULL if it holds, else what is wrong. */
HP_API const char *hp__check_input(const hp_value *root, hp_input *in) {
    hp_i64 version;
    if (!hp_is_object(root)) return "the input is not an object";
    if (!hp_integer(hp_get(root, "abiVersion"), &version) || version < 0 || version > 0xFFFFFFFFll)
        return "abiVersion is not a version number";
    in->root = root;
    in->user_id = hp_path(root, "user.id");
    if (!hp_is_string(in->user_id)) return "user.id is not a string";
    in->request = hp_get(root, "request");
    if (!in->request) return "request is missing";
    const hp_value *facts = hp_get(root, "facts");
    if (facts && !hp_is_object(facts) && !hp_is_null(facts)) return "facts is not an object";
    const hp_value *conversation = hp_get(facts, "conversation");
    in->conversation = hp_is_null(conversation) ? 0 : conversation;
    if (in->conversation) {
        const hp_value *members = hp_get(conversation, "members");
        if (!hp_is_object(conversation)) return "facts.conversation is not an object";
        if (!hp_is_string(hp_get(conversation, "id"))) return "facts.conversation.id is not a string";
        if (!hp_is_string(hp_get(conversation, "type")))
            return "facts.conversation.type is not a string";
        if (!hp_is_bool(hp_get(conversation, "isActive")))
            return "facts.conversation.isActive is not a boolean";
        if (members && !hp_is_null(members) && !hp__all_strings(members))
            return "facts.conversation.members is not an array of strings";
    }
    const hp_value *blocks = hp_get(facts, "senderBlocks");
    in->sender_blocks = blocks && !hp_is_null(blocks) ? blocks : &hp__empty_array;
    if (!hp__all_strings(in->sender_blocks)) return "facts.senderBlocks is not an array of strings";
    return 0;
}

/* ========================================================================================== */
/* Writing: a growing byte buffer in the heap, and a JSON object builder on top of it.        */

typedef struct {
    char *bytes;
    hp_u32 len, cap;
    int failed; /* out of memory (or past 2 GiB): whatever uses it answers an error */
} hp_buf;

HP_API hp_buf *hp_buf_new(void) {
    hp_buf *b = hp_alloc(sizeof *b);
    if (!b) return 0;
    b->cap = 256;
    b->len = 0;
    b->bytes = hp_alloc(b->cap);
    b->failed = !b->bytes;
    if (b->failed) b->cap = 0;
    return b;
}

HP_API void hp_buf_add(hp_buf *b, const void *bytes, hp_size len) {
    if (!b || b->failed) return;
    if ((hp_u64)b->len + len > b->cap) {
        hp_u64 cap = b->cap ? b->cap : 256;
        while (cap < (hp_u64)b->len + len) cap *= 2;
        if (cap > 0x7FFFFFFF) {
            b->failed = 1;
            return;
        }
        char *grown = hp_alloc((hp_size)cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        hp__copy(grown, b->bytes, b->len);
        b->bytes = grown;
        b->cap = (hp_u32)cap;
    }
    hp__copy(b->bytes + b->len, bytes, len);
    b->len += (hp_u32)len;
}

HP_API void hp_buf_str(hp_buf *b, const char *s) { hp_buf_add(b, s, hp__cstrlen(s)); }

HP_API void hp_buf_int(hp_buf *b, hp_i64 n) {
    char digits[20];
    int i = 20;
    hp_u64 x = n < 0 ? 0 - (hp_u64)n : (hp_u64)n;
    do digits[--i] = (char)('0' + x % 10), x /= 10;
    while (x);
    if (n < 0) hp_buf_add(b, "-", 1);
    hp_buf_add(b, digits + i, (hp_size)(20 - i));
}

/* The buffer's text with a NUL after it (for a message built from parts), or NULL. */
HP_API const char *hp_buf_cstr(hp_buf *b) {
    hp_buf_add(b, "", 1);
    if (!b || b->failed) return 0;
    b->len--;
    return b->bytes;
}

/* s[0..len) as a JSON string, at most max_chars characters of it; bytes that are not UTF-8
 * become U+FFFD. */
HP_API void hp__json_string(hp_buf *b, const char *s, hp_size len, hp_size max_chars) {
    static const char hex[] = "0123456789abcdef";
    hp_buf_add(b, "\"", 1);
    const hp_u8 *p = (const hp_u8 *)s;
    hp_size chars = 0, i = 0;
    while (i < len && chars < max_chars) {
        hp_u8 ch = p[i];
        chars++;
        if (ch == '"' || ch == '\\') {
            char esc[2] = {'\\', (char)ch};
            hp_buf_add(b, esc, 2);
            i++;
        } else if (ch < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
            if (ch == '\n') hp_buf_add(b, "\\n", 2);
            else if (ch == '\t') hp_buf_add(b, "\\t", 2);
            else if (ch == '\r') hp_buf_add(b, "\\r", 2);
            else hp_buf_add(b, esc, 6);
            i++;
        } else {
            hp_u32 seq = hp__utf8_seq(p + i, len - i);
            if (seq) hp_buf_add(b, p + i, seq), i += seq;
            else hp_buf_add(b, "\xEF\xBF\xBD", 3), i++;
        }
    }
    hp_buf_add(b, "\"", 1);
}

/* A value of the tree as JSON (numbers as the input wrote them). */
HP_API void hp__json_value(hp_buf *b, const hp_value *v) {
    /* Iterative, like the parser: the path from v to the value being written. */
    typedef struct {
        const hp_value *container;
        hp_u32 next;
    } step;
    step *stack = 0;
    hp_u32 depth = 0;
    for (;;) {
        if (v) {
            switch (v->kind) {
                case HP_NULL: hp_buf_str(b, "null"); break;
                case HP_BOOL: hp_buf_str(b, v->as.boolean ? "true" : "false"); break;
                case HP_NUMBER: hp_buf_add(b, v->as.text, v->len); break;
                case HP_STRING: hp__json_string(b, v->as.text, v->len, (hp_size)-1); break;
                case HP_ARRAY:
                case HP_OBJECT:
                    if (!stack) stack = hp_alloc(HP_MAX_DEPTH * sizeof *stack);
                    if (!stack || depth == HP_MAX_DEPTH) {
                        if (b) b->failed = 1;
                        return;
                    }
                    hp_buf_add(b, v->kind == HP_ARRAY ? "[" : "{", 1);
                    stack[depth].container = v;
                    stack[depth].next = 0;
                    depth++;
                    break;
            }
        }
        if (depth == 0) return;
        /* The next item of the innermost open container, or its end. */
        step *top = &stack[depth - 1];
        const hp_value *c = top->container;
        if (top->next == c->len) {
            hp_buf_add(b, c->kind == HP_ARRAY ? "]" : "}", 1);
            depth--;
            v = 0;
            continue;
        }
        if (top->next > 0) hp_buf_add(b, ",", 1);
        if (c->kind == HP_ARRAY) {
            v = &c->as.items[top->next];
        } else {
            const hp_member *m = &c->as.members[top->next];
            hp__json_string(b, m->key, m->key_len, (hp_size)-1);
            hp_buf_add(b, ":", 1);
            v = &m->value;
        }
        top->next++;
    }
}

/* A JSON object being built, member by member: details of a rejection, or a normalised
 * request. Members are written in the order they are put; put a key only once. */
typedef struct {
    hp_buf *buf; /* "{" and the members so far, without the closing brace */
    hp_u32 members;
} hp_json;

/* An empty object. */
HP_API hp_json *hp_object(void) {
    hp_json *o = hp_alloc(sizeof *o);
    if (!o) return 0;
    o->buf = hp_buf_new();
    o->members = 0;
    hp_buf_add(o->buf, "{", 1);
    return o;
}

HP_API hp_buf *hp__key(hp_json *o, const char *key) {
    if (!o) return 0;
    if (o->members++) hp_buf_add(o->buf, ",", 1);
    hp__json_string(o->buf, key, hp__cstrlen(key), (hp_size)-1);
    hp_buf_add(o->buf, ":", 1);
    return o->buf;
}

HP_API void hp_put_int(hp_json *o, const char *key, hp_i64 n) { hp_buf_int(hp__key(o, key), n); }
HP_API void hp_put_bool(hp_json *o, const char *key, int b) {
    hp_buf_str(hp__key(o, key), b ? "true" : "false");
}
HP_API void hp_put_null(hp_json *o, const char *key) { hp_buf_str(hp__key(o, key), "null"); }
HP_API void hp_put_strn(hp_json *o, const char *key, const char *s, hp_size len) {
    hp__json_string(hp__key(o, key), s, len, (hp_size)-1);
}
HP_API void hp_put_str(hp_json *o, const char *key, const char *s) {
    hp_put_strn(o, key, s, hp__cstrlen(s));
}
/* Any value of the input (or NULL, written as null), as it is. */
HP_API void hp_put_value(hp_json *o, const char *key, const hp_value *v) {
    hp_buf *b = hp__key(o, key);
    if (v) hp__json_value(b, v);
    else hp_buf_str(b, "null");
}
/* Another builder's object, as it is now. */
HP_API void hp_put_object(hp_json *o, const char *key, const hp_json *inner) {
    hp_buf *b = hp__key(o, key);
    if (!inner || !inner->buf || inner->buf->failed) {
        if (b) b->failed = 1;
        return;
    }
    hp_buf_add(b, inner->buf->bytes, inner->buf->len);
    hp_buf_add(b, "}", 1);
}

/* A builder holding every member of the object obj except the key `without` (NULL: none):
 * the start of a normalised request that rewrites one member. */
HP_API hp_json *hp_object_copy(const hp_value *obj, const char *without) {
    hp_json *o = hp_object();
    hp_size skip = hp__cstrlen(without);
    if (!o) return 0;
    for (hp_size i = 0; i < hp_object_len(obj); i++) {
        const hp_member *m = hp_object_at(obj, i);
        if (without && m->key_len == skip && hp__bytes_eq(m->key, without, skip)) continue;
        if (o->members++) hp_buf_add(o->buf, ",", 1);
        hp__json_string(o->buf, m->key, m->key_len, (hp_size)-1);
        hp_buf_add(o->buf, ":", 1);
        hp__json_value(o->buf, &m->value);
    }
    return o;
}

/* ========================================================================================== */
/* Verdicts.                                                                                   */

/* The codes a policy may give (ABI.md), each with its HTTP status. A code is a struct, so only
 * these constants can be passed where one is expected. */
typedef struct {
    int id;
} hp_code;

enum {
    HP__INVALID_SCHEMA,
    HP__MISSING_REQUIRED_FIELD,
    HP__INVALID_FIELD_TYPE,
    HP__FIELD_TOO_LONG,
    HP__INVALID_RECIPIENT,
    HP__FORBIDDEN,
    HP__NOT_CONVERSATION_MEMBER,
    HP__CONVERSATION_NOT_FOUND,
    HP__CONVERSATION_INACTIVE,
    HP__USER_BLOCKED,
    HP__CODES
};

#define HP_INVALID_SCHEMA ((hp_code){HP__INVALID_SCHEMA})                 /* 400 */
#define HP_MISSING_REQUIRED_FIELD ((hp_code){HP__MISSING_REQUIRED_FIELD}) /* 400 */
#define HP_INVALID_FIELD_TYPE ((hp_code){HP__INVALID_FIELD_TYPE})         /* 400 */
#define HP_FIELD_TOO_LONG ((hp_code){HP__FIELD_TOO_LONG})                 /* 400 */
#define HP_INVALID_RECIPIENT ((hp_code){HP__INVALID_RECIPIENT})           /* 400 */
#define HP_FORBIDDEN ((hp_code){HP__FORBIDDEN})                           /* 403 */
#define HP_NOT_CONVERSATION_MEMBER ((hp_code){HP__NOT_CONVERSATION_MEMBER}) /* 403 */
#define HP_CONVERSATION_NOT_FOUND ((hp_code){HP__CONVERSATION_NOT_FOUND}) /* 404 */
#define HP_CONVERSATION_INACTIVE ((hp_code){HP__CONVERSATION_INACTIVE})   /* 409 */
#define HP_USER_BLOCKED ((hp_code){HP__USER_BLOCKED})                     /* 409 */

/* The code as the wire spells it, or NULL for a value no constant has. */
HP_API const char *hp_code_str(hp_code code) {
    static const char *const names[HP__CODES] = {
        "INVALID_SCHEMA",        "MISSING_REQUIRED_FIELD",  "INVALID_FIELD_TYPE",
        "FIELD_TOO_LONG",        "INVALID_RECIPIENT",       "FORBIDDEN",
        "NOT_CONVERSATION_MEMBER", "CONVERSATION_NOT_FOUND", "CONVERSATION_INACTIVE",
        "USER_BLOCKED"};
    return code.id >= 0 && code.id < HP__CODES ? names[code.id] : 0;
}

/* The HTTP status the gateway answers with for the code (0 for none). */
HP_API int hp_code_status(hp_code code) {
    if (code.id < 0 || code.id >= HP__CODES) return 0;
    if (code.id <= HP__INVALID_RECIPIENT) return 400;
    if (code.id <= HP__NOT_CONVERSATION_MEMBER) return 403;
    if (code.id == HP__CONVERSATION_NOT_FOUND) return 404;
    return 409;
}

typedef enum { HP_VERDICT_ALLOW = 1, HP_VERDICT_ALLOW_NORMALIZED, HP_VERDICT_REJECT } hp_verdict_kind;

typedef struct {
    hp_verdict_kind kind;
    hp_code code;          /* a rejection's */
    const char *message;   /* a rejection's, NUL-terminated (NULL: none) */
    const hp_json *object; /* a rejection's details (NULL: none), or the normalised request */
} hp_verdict;

typedef hp_verdict (*hp_policy_fn)(const hp_input *in);

HP_API hp_verdict hp_allow(void) { return (hp_verdict){HP_VERDICT_ALLOW, {0}, 0, 0}; }

/* Allow with the request replaced by `request` (an object builder, e.g. from hp_object_copy)
 * for the rest of the chain and for the publish. */
HP_API hp_verdict hp_allow_normalized(const hp_json *request) {
    return (hp_verdict){HP_VERDICT_ALLOW_NORMALIZED, {0}, 0, request};
}

HP_API hp_verdict hp_reject(hp_code code, const char *message) {
    return (hp_verdict){HP_VERDICT_REJECT, code, message, 0};
}

HP_API hp_verdict hp_reject_details(hp_code code, const char *message, const hp_json *details) {
    return (hp_verdict){HP_VERDICT_REJECT, code, message, details};
}

/* --- The output. ------------------------------------------------------------------------ */

/* {"verdict":"error","message":...}: a policy failure on the host's side. */
HP_API const char *hp__error_output(const char *message, hp_size *out_len) {
    static const char fallback[] = "{\"verdict\":\"error\",\"message\":\"out of memory\"}";
    hp_buf *b = hp_buf_new();
    hp_buf_str(b, "{\"verdict\":\"error\",\"message\":");
    hp__json_string(b, message, hp__cstrlen(message), HP_MAX_MESSAGE_CHARS);
    hp_buf_add(b, "}", 1);
    if (!b || b->failed) {
        *out_len = sizeof fallback - 1;
        return fallback;
    }
    *out_len = b->len;
    return b->bytes;
}

HP_API int hp__object_ok(const hp_json *o) { return o && o->buf && !o->buf->failed; }

HP_API hp_buf *hp__verdict_output(hp_verdict v, int with_details) {
    hp_buf *b = hp_buf_new();
    if (v.kind == HP_VERDICT_ALLOW) {
        hp_buf_str(b, "{\"verdict\":\"allow\"}");
    } else if (v.kind == HP_VERDICT_ALLOW_NORMALIZED) {
        hp_buf_str(b, "{\"verdict\":\"allow\",\"request\":");
        hp_buf_add(b, v.object->buf->bytes, v.object->buf->len);
        hp_buf_str(b, "}}");
    } else {
        hp_buf_str(b, "{\"verdict\":\"reject\",\"code\":\"");
        hp_buf_str(b, hp_code_str(v.code));
        hp_buf_str(b, "\"");
        if (v.message) {
            hp_buf_str(b, ",\"message\":");
            hp__json_string(b, v.message, hp__cstrlen(v.message), HP_MAX_MESSAGE_CHARS);
        }
        if (v.object && with_details) {
            hp_buf_str(b, ",\"details\":");
            hp_buf_add(b, v.object->buf->bytes, v.object->buf->len);
            hp_buf_add(b, "}", 1);
        } else if (v.object) {
            hp_buf_str(b, ",\"details\":{}");
        }
        hp_buf_add(b, "}", 1);
    }
    return b;
}

/* Everything hotpath_validate does between the input bytes and the output bytes: parse, check
 * the shape, call `policy`, write its verdict. Native tests call it to run a policy exactly as
 * the module would (hp_reset() between calls, like a fresh instance). */
HP_API const char *hp_evaluate(const char *input, hp_size len, hp_policy_fn policy,
                               hp_size *out_len) {
    hp_parse_error error = {0, 0};
    const hp_value *root = hp_parse(input, len, &error);
    if (!root) {
        hp_buf *b = hp_buf_new();
        hp_buf_str(b, "policy input is not JSON: ");
        hp_buf_str(b, error.what);
        hp_buf_str(b, " at byte ");
        hp_buf_int(b, error.offset);
        const char *message = hp_buf_cstr(b);
        return hp__error_output(message ? message : "policy input is not JSON", out_len);
    }
    hp_input in;
    const char *wrong = hp__check_input(root, &in);
    if (wrong) {
        hp_buf *b = hp_buf_new();
        hp_buf_str(b, "policy input is not ABI v1: ");
        hp_buf_str(b, wrong);
        const char *message = hp_buf_cstr(b);
        return hp__error_output(message ? message : "policy input is not ABI v1", out_len);
    }
    hp_verdict v = policy(&in);
    if (v.kind != HP_VERDICT_ALLOW && v.kind != HP_VERDICT_ALLOW_NORMALIZED &&
        v.kind != HP_VERDICT_REJECT)
        return hp__error_output("the policy returned no verdict", out_len);
    if (v.kind == HP_VERDICT_REJECT && !hp_code_str(v.code))
        return hp__error_output("the policy rejected with a code outside the ABI", out_len);
    if (v.kind == HP_VERDICT_ALLOW_NORMALIZED && !hp__object_ok(v.object))
        return hp__error_output("the normalised request could not be built", out_len);
    if (v.kind == HP_VERDICT_REJECT && v.object && !hp__object_ok(v.object))
        return hp__error_output("the rejection's details could not be built", out_len);
    hp_buf *out = hp__verdict_output(v, 1);
    if (out && !out->failed && out->len > HP_MAX_OUTPUT_BYTES && v.kind == HP_VERDICT_REJECT)
        out = hp__verdict_output(v, 0);
    if (!out || out->failed) return hp__error_output("out of memory writing the verdict", out_len);
    *out_len = out->len;
    return out->bytes;
}

/* ========================================================================================== */
/* The exports.                                                                                */

#if defined(__wasm32__)
HP_API int hp__export_alloc(int len) {
    if (len < 0) return 0;
    return (int)(hp_uptr)hp_alloc((hp_size)len);
}

HP_API long long hp__export_validate(int ptr, int len, hp_policy_fn policy) {
    hp_size out_len = 0;
    const char *out;
    if (len < 0 || (ptr == 0 && len > 0))
        out = hp__error_output("hotpath_validate: invalid input pointer or length", &out_len);
    else
        out = hp_evaluate((const char *)(hp_uptr)(hp_u32)ptr, (hp_size)len, policy, &out_len);
    return (long long)(((hp_u64)(hp_uptr)out << 32) | (hp_u64)(hp_u32)out_len);
}

#define HOTPATH_POLICY(f)                                                                      \
    __attribute__((export_name("hotpath_abi_version"))) int hotpath_abi_version(void) {        \
        return HP_ABI_VERSION;                                                                 \
    }                                                                                          \
    __attribute__((export_name("hotpath_alloc"))) int hotpath_alloc(int len) {                 \
        return hp__export_alloc(len);                                                          \
    }                                                                                          \
    __attribute__((export_name("hotpath_validate"))) long long hotpath_validate(int ptr,       \
                                                                                int len) {     \
        return hp__export_validate(ptr, len, (f));                                             \
    }
#else
/* Natively nothing is exported: tests run the policy with
 * hp_evaluate(input, len, hotpath_policy, &out_len). */
#define HOTPATH_POLICY(f) static const hp_policy_fn hotpath_policy __attribute__((unused)) = (f);
#endif

#endif /* HOTPATH_POLICY_H */
