# Loads a script too long for a command line (cmd.exe stops at 8191 characters) from standard
# input and runs it. The first $Length bytes of stdin are the script as UTF-8; whatever follows
# stays on stdin for the script itself.
param(
    [Parameter(Mandatory = $true)][int]$Length
)
$ErrorActionPreference = 'Stop'
$stdin = [Console]::OpenStandardInput()
$buffer = New-Object byte[] $Length
$read = 0
while ($read -lt $Length) {
    $count = $stdin.Read($buffer, $read, $Length - $read)
    if ($count -le 0) { break }
    $read += $count
}
if ($read -ne $Length) {
    throw "expected a $Length-byte script on standard input, got $read bytes"
}
$ErrorActionPreference = 'Continue'
& ([scriptblock]::Create([Text.Encoding]::UTF8.GetString($buffer, 0, $read)))
