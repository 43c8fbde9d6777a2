#!/usr/bin/env python3
"""Checks two structural rules of the Swift sources, from the code itself.

1. Layer order. docs/ARCHITECTURE.md states the order of MoECore's folders on a line
   `Layer order: A -> B -> C, D` (bottom first; folders joined by a comma are peers). A folder
   may name a type or free function declared in a folder below it, never one above it or a peer.
2. Function length. No function, initializer or accessor in Sources/ spans more than 60 lines.

Usage: check-structure.py [REPO_ROOT]. Prints every violation and exits 1 if there is any.
"""
import os
import re
import sys

MAX_LINES = 60
DECLARATION = re.compile(
    r'^(?:(?:public|internal|fileprivate|private|final|open|indirect|@\w+(?:\([^)]*\))?)\s+)*'
    r'(?:class|struct|enum|protocol|typealias|actor|func)\s+([A-Za-z_]\w*)', re.M)
FUNCTION = re.compile(r'\b(?:func\s+[^\s(<]+|init[?!]?)\s*[(<]')


def strip(source):
    """Source with comments and string literals blanked out, line structure kept."""
    source = re.sub(r'/\*.*?\*/', lambda m: '\n' * m.group(0).count('\n'), source, flags=re.S)
    source = re.sub(r'"""(.*?)"""', lambda m: '""' + '\n' * m.group(0).count('\n'), source, flags=re.S)
    lines = []
    for line in source.split('\n'):
        line = re.sub(r'"(?:\\.|[^"\\])*"', '""', line)
        lines.append(re.sub(r'//.*', '', line))
    return '\n'.join(lines)


def swift_files(directory):
    for folder, _, names in os.walk(directory):
        for name in sorted(names):
            if name.endswith('.swift'):
                yield os.path.join(folder, name)


def layer_order(root):
    with open(os.path.join(root, 'docs', 'ARCHITECTURE.md')) as file:
        for line in file:
            match = re.match(r'\s*Layer order:\s*(.+)', line.strip().strip('`'))
            if match:
                levels = [[name.strip(' `') for name in level.split(',')] for level in match.group(1).split('->')]
                return {name: index for index, level in enumerate(levels) for name in level}
    sys.exit('docs/ARCHITECTURE.md: no "Layer order:" line')


def check_layers(root):
    core = os.path.join(root, 'Sources', 'MoECore')
    level = layer_order(root)
    declared, sources = {}, []
    for path in swift_files(core):
        folder = os.path.relpath(path, core).split(os.sep)[0]
        if folder not in level:
            yield f'{path}: folder {folder} is not in the layer order of docs/ARCHITECTURE.md'
            continue
        with open(path) as file:
            source = strip(file.read())
        sources.append((path, folder, source))
        for match in DECLARATION.finditer(source):
            declared.setdefault(match.group(1), set()).add(folder)
    for path, folder, source in sources:
        for number, line in enumerate(source.split('\n'), 1):
            for word in set(re.findall(r'\b[A-Za-z_]\w*\b', line)):
                for owner in declared.get(word, ()):
                    if owner != folder and level[owner] >= level[folder] and folder not in declared[word]:
                        relation = 'a peer' if level[owner] == level[folder] else 'above it'
                        yield f'{path}:{number}: {folder} names {word} from {owner}, {relation} in the layer order'


def check_lengths(root):
    for path in swift_files(os.path.join(root, 'Sources')):
        with open(path) as file:
            lines = strip(file.read()).split('\n')
        for start, line in enumerate(lines):
            if not FUNCTION.search(line) or re.search(r'\bprotocol\b', line):
                continue
            depth, opened = 0, False
            for end in range(start, len(lines)):
                for character in lines[end]:
                    if character == '{':
                        depth, opened = depth + 1, True
                    elif character == '}':
                        depth -= 1
                if opened and depth <= 0:
                    break
                if not opened and end > start and lines[end].strip() == '':
                    break   # a requirement without a body
            if opened and end - start + 1 > MAX_LINES:
                name = FUNCTION.search(line).group(0).rstrip('(<')
                yield f'{path}:{start + 1}: {name} spans {end - start + 1} lines (at most {MAX_LINES})'


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '..', '..', '..')
    problems = list(check_layers(root)) + list(check_lengths(root))
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print('layer order and function lengths: ok')


if __name__ == '__main__':
    main()
