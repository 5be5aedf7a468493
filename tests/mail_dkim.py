"""DKIM verification with Perl Mail::DKIM, the independent verifier of the bench and the tests.

Keys come from a records file, never from DNS: the script answers Mail::DKIM's key queries itself. Debian
packages it as libmail-dkim-perl (``.ci/run`` installs it).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

PERL_VERIFIER = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS;

my %records;
my $records_file = shift @ARGV;
open my $fh, '<', $records_file or die "records: $!";
while (my $line = <$fh>) {
    chomp $line;
    my ($name, $txt) = split /\t/, $line, 2;
    $records{lc $name} = $txt;
}
close $fh;
{
    # No network: answer the key query from the records file.
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        my $txt = $records{lc $name};
        if (!defined $txt) { $@ = 'NXDOMAIN'; return; }
        my @strings = unpack '(a250)*', $txt;
        return Net::DNS::RR->new(owner => $name, type => 'TXT', txtdata => \@strings);
    };
}
foreach my $file (@ARGV) {
    open my $in, '<:raw', $file or die "$file: $!";
    my $message = do { local $/; <$in> };
    close $in;
    my $dkim = Mail::DKIM::Verifier->new();
    $dkim->PRINT($message);
    $dkim->CLOSE;
    my @sigs = $dkim->signatures;
    print "$file\t-\t-\tno signature\n" unless @sigs;
    foreach my $sig (@sigs) {
        printf "%s\t%s\t%s\t%s\n", $file, ($sig->domain // ''), ($sig->selector // ''), $sig->result_detail;
    }
}
"""


def verify_files(
    files: Iterable[Path], records: Mapping[str, str], workdir: Path
) -> list[tuple[str, str, str, str]]:
    """(file, d=, s=, result) for every signature of every file (``-`` for d= and s= when a file has none),
    in one Perl process. ``records`` maps ``<selector>._domainkey.<domain>`` to the TXT text. Raises
    RuntimeError when the verifier itself fails."""
    script = workdir / "mail-dkim-verify.pl"
    script.write_text(PERL_VERIFIER)
    records_file = workdir / "mail-dkim-records.tsv"
    records_file.write_text("".join(f"{name}\t{txt}\n" for name, txt in records.items()))
    proc = subprocess.run(
        ["perl", str(script), str(records_file), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"Mail::DKIM verifier failed: {proc.stderr.strip()[-500:]}")
    out = []
    for line in proc.stdout.splitlines():
        name, domain, selector, detail = line.split("\t")
        out.append((name, domain, selector, detail))
    return out
